"""GradCache (Gao et al. 2021): a contrastive batch of any size at the memory cost of one chunk.

The loss couples every embedding of the batch, but the encoder does not: so embed everything without
a graph, take d loss / d embedding on the small [n, d] matrix, then re-embed chunk by chunk with a
graph and push that gradient through. Each chunk's RNG state is recorded before its first pass and
restored for its second, so dropout masks replay exactly and the result equals one plain forward of
the same chunks in the same order (and the full-batch run when a chunk holds a whole group).

RNG convention: on return, the RNG (CPU, and the current CUDA device if CUDA is in use) is left as
after the no-grad pass, i.e. as if each chunk had been embedded once; the replays leave no trace.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def rng_state() -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[Tensor, Tensor | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def _chunks(group: dict[str, Tensor], chunk_size: int) -> list[dict[str, Tensor]]:
    sizes = {v.shape[0] for v in group.values() if isinstance(v, Tensor)}
    if len(sizes) != 1:
        raise ValueError(f"gradcache: a group's tensors must share their first dimension, got {sorted(sizes)}")
    n = sizes.pop()
    return [{k: v[i : i + chunk_size] if isinstance(v, Tensor) else v for k, v in group.items()}
            for i in range(0, n, chunk_size)]


def gradcache_backward(embed_fn: Callable[[dict[str, Tensor]], Tensor], groups: Sequence[dict[str, Tensor]],
                       loss_fn: Callable[..., Tensor], chunk_size: int, loss_scale: float = 1.0,
                       backward: Callable[[Tensor], None] = Tensor.backward,
                       loss_backward: Callable[[Tensor], None] = Tensor.backward) -> Tensor:
    """Accumulate d(loss * loss_scale)/d params into .grad; returns the (unscaled) loss, detached.

    Every chunk's backward is of a scalar through `backward` (an engine may need to see each one): it
    backpropagates sum(emb * cached_grad), whose gradient w.r.t. emb is exactly cached_grad. The loss
    itself goes through `loss_backward`: plain autograd when it only reaches the cached embeddings (a
    ZeRO engine's backward expects parameters to reduce), the engine's when the loss has parameters
    of its own (a D2LLM IEM).

    `groups` are tokenised batches, one per role (queries, positives, ...); `loss_fn` receives one
    [n_g, d] embedding matrix per group. `loss_fn` may gather across ranks: its backward runs once,
    on every rank at the same point, like a plain step.
    """
    if chunk_size < 1:
        raise ValueError(f"gradcache chunk_size must be >= 1, got {chunk_size}")
    chunked = [_chunks(g, chunk_size) for g in groups]

    states: list[list[tuple[Tensor, Tensor | None]]] = []
    cached: list[Tensor] = []
    with torch.no_grad():
        for chunks in chunked:
            states.append([])
            parts = []
            for chunk in chunks:
                states[-1].append(rng_state())
                parts.append(embed_fn(chunk))
            cached.append(torch.cat(parts).detach().requires_grad_())
    after_first_pass = rng_state()

    loss = loss_fn(*cached)
    loss_backward(loss * loss_scale)

    for chunks, chunk_states, reps in zip(chunked, states, cached):
        if reps.grad is None:  # the loss ignored this group
            continue
        start = 0
        for chunk, state in zip(chunks, chunk_states):
            set_rng_state(state)
            emb = embed_fn(chunk)
            backward((emb * reps.grad[start : start + emb.shape[0]].to(emb.dtype)).sum())
            start += emb.shape[0]
    set_rng_state(after_first_pass)
    return loss.detach()
