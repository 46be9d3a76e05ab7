"""Turning a window of samples into batches: length bucketing, token budgets, sequence packing.

All pure functions of their inputs (and an explicit RNG), so the streaming loader can rebuild any
window exactly when it resumes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from toolkit.config import ConfigError


def window_batches(
    lengths: Sequence[int], batch_size: int, rng: np.random.Generator | None, *, max_tokens: int = 0,
    sort: bool = True,
) -> list[list[int]]:
    """Index batches over one window of samples.

    sort=True groups similar lengths (little padding) and `rng` then shuffles the batch order so
    the step-to-step length sequence stays random. With `max_tokens` a batch holds as many
    samples as fit `len(batch) * longest <= max_tokens` (at most `batch_size`); otherwise batches
    are exactly `batch_size` and a short remainder is dropped (the caller sizes windows in whole
    batches, so that only happens at a window the stream could not fill).
    """
    if batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
    order = list(np.argsort(np.asarray(lengths), kind="stable")) if sort else list(range(len(lengths)))
    batches: list[list[int]] = []
    if max_tokens:
        current: list[int] = []
        for i in order:
            longest = max([lengths[j] for j in current] + [lengths[i]])
            if current and (len(current) >= batch_size or (len(current) + 1) * longest > max_tokens):
                batches.append(current)
                current = []
            current.append(int(i))
        if current:
            batches.append(current)
    else:
        full = len(order) // batch_size * batch_size
        batches = [[int(i) for i in order[k : k + batch_size]] for k in range(0, full, batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def first_fit(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy first-fit of samples (by length, in order) into rows of at most `max_tokens` tokens;
    a sample longer than `max_tokens` counts as `max_tokens`. The indices of each row, in order."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i, length in enumerate(lengths):
        n = min(length, max_tokens)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_tokens - n)
    return rows


def pack_sequences(token_lists: Sequence[Sequence[int]], max_tokens: int) -> list[dict]:
    """Greedy first-fit packing of tokenised samples into rows of at most `max_tokens` tokens.

    Each packed row keeps its sample boundaries: `cu_seqlens` (cumulative lengths, for
    flash-attention's varlen kernels, which attend within each sample only), `position_ids`
    restarting at 0 per sample, and `samples` (the indices packed, in order). A sample longer than
    `max_tokens` is truncated to it.
    """
    rows = first_fit([len(ids) for ids in token_lists], max_tokens)
    packed = []
    for members in rows:
        ids, pos, cu = [], [], [0]
        for i in members:
            seq = list(token_lists[i])[:max_tokens]
            ids += seq
            pos += list(range(len(seq)))
            cu.append(cu[-1] + len(seq))
        packed.append({"input_ids": ids, "position_ids": pos, "cu_seqlens": cu, "samples": members})
    return packed
