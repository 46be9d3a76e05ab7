"""Cosine InfoNCE for SimCSE and supervised LLM2Vec (1.3, 1.4), with negatives from the global batch.

Each rank scores only its LOCAL queries against the keys of the GLOBAL batch (gathered with gradient),
so the per-rank loss is the mean over local queries. With equal local batches and DDP-style gradient
averaging, mean-over-ranks of the loss and of the gradients equal the single-process full-batch ones.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

GatherFn = Callable[[Tensor], tuple[Tensor, int]]
"""(global concatenation along dim 0, with gradient to the local rows; offset of the local rows)."""


def _gather(x: Tensor, gather: GatherFn | None) -> tuple[Tensor, int]:
    return gather(x) if gather is not None else (x, 0)


def info_nce(queries: Tensor, keys: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Mean CE over cos(query, key) / temperature; computed in at least float32 (bf16 inputs upcast)."""
    dtype = torch.promote_types(torch.promote_types(queries.dtype, keys.dtype), torch.float32)
    q = F.normalize(queries.to(dtype), dim=-1)
    k = F.normalize(keys.to(dtype), dim=-1)
    return F.cross_entropy(q @ k.T / temperature, targets)


def simcse_loss(view_a: Tensor, view_b: Tensor, temperature: float = 0.05, gather: GatherFn | None = None) -> Tensor:
    """view_a[i]'s positive is view_b[i]; every other view_b of the global batch is a negative."""
    keys, offset = _gather(view_b, gather)
    targets = torch.arange(view_a.shape[0], device=view_a.device) + offset
    return info_nce(view_a, keys, targets, temperature)


def supervised_contrastive_loss(queries: Tensor, positives: Tensor, hard_negatives: Tensor | None,
                                temperature: float = 0.02, gather: GatherFn | None = None) -> Tensor:
    """Keys = [all positives ; all hard negatives (flattened b*k)] of the global batch; k >= 0.

    A [b, 0, d] `hard_negatives` is still gathered, so ranks that disagree on k fail in the shape check
    instead of deadlocking; pass None only when every rank has none.
    """
    b, d = queries.shape
    if positives.shape != (b, d):
        raise ValueError(f"positives {tuple(positives.shape)} must match queries {(b, d)}")
    keys, offset = _gather(positives, gather)
    if hard_negatives is not None:
        if hard_negatives.dim() != 3 or hard_negatives.shape[0] != b or hard_negatives.shape[2] != d:
            raise ValueError(f"hard_negatives must be [{b}, k, {d}], got {tuple(hard_negatives.shape)}")
        negatives, _ = _gather(hard_negatives.reshape(-1, d), gather)
        keys = torch.cat([keys, negatives])
    targets = torch.arange(b, device=queries.device) + offset
    return info_nce(queries, keys, targets, temperature)
