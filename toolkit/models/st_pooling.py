"""sentence-transformers module wrapping our pooling heads, so exported folders pool like `Encoder`.

An exported folder names this class in `modules.json`; `SentenceTransformer(dir)` imports it from the
installed `embedforge` package. The prompt (instruction) is excluded from pooling exactly as in
`Encoder`, through sentence-transformers' own `prompt_length` feature.
"""

from __future__ import annotations

from typing import Any

from sentence_transformers.base.modules import Module
from torch import Tensor

from toolkit.config import PoolingConfig
from toolkit.models.pooling import Pooling, exclude_prefix


class EmbedforgePooling(Module):
    config_keys = ["mode", "hidden_size", "heads", "num_latents", "num_seeds"]

    def __init__(self, mode: str, hidden_size: int, heads: int = 8, num_latents: int = 512, num_seeds: int = 1):
        super().__init__()
        self.mode, self.hidden_size = mode, hidden_size
        self.heads, self.num_latents, self.num_seeds = heads, num_latents, num_seeds
        cfg = PoolingConfig(mode=mode, heads=heads, num_latents=num_latents, num_seeds=num_seeds)  # type: ignore[arg-type]
        self.pooling = Pooling(cfg, hidden_size)

    @classmethod
    def from_pooling(cls, pooling: Pooling) -> "EmbedforgePooling":
        c = pooling.cfg
        module = cls(c.mode, pooling.hidden_size, c.heads, c.num_latents, c.num_seeds)
        module.pooling.load_state_dict(pooling.state_dict())
        return module

    def forward(self, features: dict[str, Tensor | Any], **kwargs) -> dict[str, Tensor | Any]:
        attention_mask = features["attention_mask"]
        prompt_length = features.get("prompt_length")
        if isinstance(prompt_length, Tensor):
            prompt_length = int(prompt_length.reshape(-1)[0].item())
        embed_mask = exclude_prefix(attention_mask, int(prompt_length or 0))
        features["sentence_embedding"] = self.pooling(features["token_embeddings"], attention_mask, embed_mask)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.pooling.output_dim

    get_embedding_dimension = get_sentence_embedding_dimension

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)
        if self.pooling.has_parameters:
            self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> "EmbedforgePooling":
        hub = {k: kwargs[k] for k in ("token", "cache_folder", "revision", "local_files_only") if k in kwargs}
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
        module = cls(**config)
        if module.pooling.has_parameters:
            cls.load_torch_weights(model_name_or_path, subfolder=subfolder, model=module, **hub)
        return module
