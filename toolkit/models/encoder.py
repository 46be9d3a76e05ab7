"""Encoder = backbone (bidirectional decoder) + pooling head + instruction handling.

The saved format IS a sentence-transformers folder (plus `embedforge.json`), so a trained model
loads with `SentenceTransformer(dir)` and embeds identically, and `Encoder.from_pretrained(dir)`
reads the same folder back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from toolkit.config import ConfigError
from toolkit.errors import CheckpointError, EmbedforgeError, InputError, MissingPathError
from toolkit.models.bidirectional import check_bidirectional, make_bidirectional
from toolkit.models.export import write_sentence_transformers_folder
from toolkit.models.folder import SPEC_FILE, EncoderSpec, load_iem_weights, load_pooling_weights, load_spec
from toolkit.models.iem import InteractionEmulation
from toolkit.models.packing import pack_for_backbone
from toolkit.models.pooling import Pooling, exclude_prefix
from toolkit.run_layout import COMPLETE, RunLayout, parse_stage_dir, parse_step_dir


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Right padding (instruction prefixes start at position 0) and a pad token (EOS if none)."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise CheckpointError("tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer: PreTrainedTokenizerBase, pooling: Pooling, spec: EncoderSpec):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.tokenizer = prepare_tokenizer(tokenizer) if tokenizer is not None else None  # None: a meta-device dry run
        self.spec = spec
        self.iem: nn.Module | None = None
        if spec.iem_hidden:
            self.add_iem(spec.iem_hidden, spec.iem_cosine_scale)
        self._prompt_lengths: dict[str, int] = {}
        self.pack = False  # run the backbone on packed texts (a training stage's data.pack)

    def add_iem(self, hidden: int, cosine_scale: float = 0.0) -> nn.Module:
        """Attach a D2LLM Interaction Emulation Module over the pooled embeddings (kept if present)."""
        if self.iem is None:
            self.iem = InteractionEmulation(self.pooling.output_dim, hidden, cosine_scale)
            self.spec.iem_hidden, self.spec.iem_cosine_scale = hidden, float(cosine_scale)
        elif self.iem.hidden != hidden:
            raise ConfigError(f"d2llm.iem_hidden={hidden}, but this encoder's IEM has {self.iem.hidden}")
        elif self.iem.cosine_scale != cosine_scale:
            raise ConfigError(f"d2llm.cosine_scale={cosine_scale:g}, but this encoder's IEM has "
                              f"{self.iem.cosine_scale:g}")
        return self.iem

    # ------------------------------------------------------------------ tokenisation
    def format_instruction(self, instruction: str | None) -> str:
        if not instruction:
            return ""
        return self.spec.pooling.instruction_template.format(instruction=instruction)

    def prompt_length(self, prompt: str) -> int:
        """Tokens of `prompt` alone, minus a trailing special token (as sentence-transformers counts)."""
        if not prompt:
            return 0
        if prompt not in self._prompt_lengths:
            ids = self.tokenizer(prompt)["input_ids"]
            n = len(ids) - (1 if ids and ids[-1] in self.tokenizer.all_special_ids else 0)
            if n >= self.spec.max_length:
                raise InputError(
                    f"instruction {prompt!r} is {n} tokens, not shorter than max_length={self.spec.max_length}"
                )
            self._prompt_lengths[prompt] = n
        return self._prompt_lengths[prompt]

    def tokenize(self, texts: Sequence[str], instruction: str | None = None, max_length: int | None = None) -> dict:
        """input_ids / attention_mask / embed_mask (instruction tokens attended, not pooled)."""
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InputError(f"text #{i} is empty or not a string ({t!r}); drop it before encoding")
        if max_length is not None and max_length < 1:  # None, not 0, means "the folder's length"
            raise InputError(f"max_length={max_length}: must be >= 1 (None: this encoder's {self.spec.max_length})")
        prompt = self.format_instruction(instruction)
        batch = self.tokenizer(
            [prompt + t for t in texts],
            padding=True,
            truncation=True,
            max_length=self.spec.max_length if max_length is None else max_length,
            return_tensors="pt",
        )
        batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        batch["embed_mask"] = exclude_prefix(batch["attention_mask"], self.prompt_length(prompt))
        return batch

    # ------------------------------------------------------------------ forward / encode
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def hidden_states(self, batch: dict) -> Tensor:
        """Final hidden states [b, s, h] of a padded batch; with `pack`, the backbone runs the texts
        packed (no pad tokens) and the states come back in the padded layout."""
        if not self.pack:
            out = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            return out.last_hidden_state
        impl = self.backbone.config._attn_implementation
        packed = pack_for_backbone(batch["input_ids"], batch["attention_mask"], impl)
        mask = packed.attention_mask(impl, next(self.backbone.parameters()).dtype)
        out = self.backbone(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=mask,
                            use_cache=False)
        return packed.unpack(out.last_hidden_state)

    def forward(self, batch: dict) -> Tensor:
        """Unnormalised embeddings [b, output_dim] with the graph (for training)."""
        return self.pooling(self.hidden_states(batch), batch["attention_mask"], batch["embed_mask"])

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        instruction: str | None = None,
        batch_size: int = 32,
        normalize: bool = True,
        dim: int | None = None,
        max_length: int | None = None,
    ) -> np.ndarray:
        """Embeddings [n, dim] in input order; batches are length-sorted so little padding is computed.

        `dim` truncates to the first `dim` components (Matryoshka) before normalising.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not a single string")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r} must be a positive integer")
        if dim is not None and not 0 < dim <= self.pooling.output_dim:
            raise InputError(f"dim={dim} must be in 1..{self.pooling.output_dim}")
        was_training = self.training
        self.eval()
        order = np.argsort(-self.token_lengths(texts, instruction), kind="stable")
        chunks = [order[start : start + batch_size] for start in range(0, len(texts), batch_size)]
        batches = (self.tokenize([texts[i] for i in idx], instruction, max_length) for idx in chunks)
        out = np.zeros((len(texts), dim or self.pooling.output_dim), dtype=np.float32)
        for idx, emb in zip(chunks, self.embed_batches(batches)):
            emb = emb[:, :dim] if dim else emb
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out[idx] = emb.float().cpu().numpy()
        self.train(was_training)
        return out

    def token_lengths(self, texts: Sequence[str], instruction: str | None = None) -> np.ndarray:
        """Untruncated tokens of each text with its instruction: the length order of `encode`, and
        what a caller compares with max_length to count truncated texts."""
        prompt = self.format_instruction(instruction)
        return np.asarray([len(ids) for ids in self.tokenizer([prompt + t for t in texts])["input_ids"]], dtype=np.int64)

    def embed_batches(self, batches: Iterable[dict]) -> Iterator[Tensor]:
        """Unnormalised embeddings of tokenized batches, in order (an inference forward per batch)."""
        for batch in batches:
            yield self({k: v.to(self.device) for k, v in batch.items()})

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | os.PathLike, max_length: int | None = None) -> Path:
        """Write a sentence-transformers folder atomically (temp dir, then rename); `max_length`: the
        length the folder encodes at (a run's export.max_seq_length), default this encoder's own."""
        return write_sentence_transformers_folder(self, Path(path), max_length)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
    ) -> "Encoder":
        path = Path(path)
        spec_file = path / SPEC_FILE
        if not spec_file.is_file():
            raise _not_an_encoder(path)
        spec = load_spec(spec_file)
        check_safetensors(path)
        backbone = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
        if spec.bidirectional:
            make_bidirectional(backbone)
            check_bidirectional(backbone)
        tokenizer = AutoTokenizer.from_pretrained(path)
        pooling = Pooling(spec.pooling, backbone.config.hidden_size)
        load_pooling_weights(pooling, path, required=True)
        encoder = cls(backbone, tokenizer, pooling, spec)
        if encoder.iem is not None:
            load_iem_weights(encoder, path)
        return encoder.to(device).eval()


def _not_an_encoder(path: Path) -> EmbedforgeError:
    """Why `path` is no encoder folder: missing, a training checkpoint / run / stage (export it first), or other."""
    if not path.exists():
        return MissingPathError(f"{path}: no such file or directory")
    checkpoint = (parse_step_dir(path) is not None or (path / COMPLETE).is_file() or (path / "meta.json").is_file()
                  or (path / "trainer_state.json").exists())
    if checkpoint or RunLayout(path).is_run() or parse_stage_dir(path):
        kind = "a training checkpoint" if checkpoint else "a run or stage folder"
        return CheckpointError(f"{path}: {kind}, not an encoder folder; run `embedforge export --checkpoint {path} "
                               "--output DIR` first, then use DIR")
    return MissingPathError(f"{path / SPEC_FILE}: not an Embedforge encoder folder (no {SPEC_FILE})")


def check_safetensors(folder: Path) -> None:
    """Every *.safetensors file of an encoder folder has a complete header and covers its data (a cheap
    header read): a torn or truncated file fails here with one line naming it, not deep inside a loader."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt: {exc})") from None
