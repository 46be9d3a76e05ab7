"""Reference encoders scored next to ours on the same local tasks (ASSETS.md asks for MiniLM)."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from toolkit.assets import minilm_dir

EncodeFn = Callable[[list[str], "str | None"], np.ndarray]


def minilm_encoder(batch_size: int = 64, device: str = "cpu") -> EncodeFn:
    """all-MiniLM-L6-v2 (22.7M, 384-d): encode(texts, instruction) -> L2-normalised rows.

    The instruction is ignored: MiniLM was not trained with instructions. Loads offline only.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must never fall back to the hub
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir()), device=device)

    def encode(texts: list[str], instruction: str | None = None) -> np.ndarray:
        return model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)

    encode.model = model  # type: ignore[attr-defined]  # for callers that want the dimension etc.
    return encode
