"""All-gather WITH gradient, for in-batch negatives across data-parallel ranks.

A plain `dist.all_gather` returns leaves without history, so the other ranks' keys would act as
constants and the global-batch loss would have the wrong gradient. The autograd-aware all_gather
sums, in backward, every rank's gradient w.r.t. this rank's rows (a reduce-scatter); combined with
DDP's gradient averaging this gives exactly the gradient of the mean global loss.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor

from toolkit.objectives.contrastive import GatherFn

_MAX_DIMS = 8


def _check_equal_shapes(tensor: Tensor, group, world: int) -> None:
    """The autograd all_gather needs identical shapes; a mismatch would hang or corrupt silently."""
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"gather_with_grad supports up to {_MAX_DIMS} dims, got {tensor.dim()}")
    mine = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.long, device=tensor.device)
    mine[0] = tensor.dim()
    mine[1 : tensor.dim() + 1] = torch.tensor(tensor.shape, dtype=torch.long)
    shapes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(shapes, mine, group=group)
    seen = [tuple(s[1 : int(s[0]) + 1].tolist()) for s in shapes]
    if any(s != seen[0] for s in seen):
        raise ValueError(f"gather_with_grad needs the same shape on every rank (equal local batches); "
                         f"got {seen} (rank order)")


def gather_with_grad(tensor: Tensor, group=None) -> tuple[Tensor, int]:
    """(concatenation over the ranks of `group` along dim 0, offset of this rank's rows).

    `group=None` means the default (world) group; a passed group is always used as is. Without an
    initialised process group, or with one rank, returns (tensor, 0) unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor, 0
    pg = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(pg)
    if world == 1:
        return tensor, 0
    rank = dist.get_rank(pg)
    if rank < 0:
        raise ValueError("gather_with_grad: this process is not a member of the given process group")
    _check_equal_shapes(tensor, pg, world)
    return _AllGatherWithGrad.apply(tensor, pg), rank * tensor.shape[0]


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums every rank's gradient for this rank's rows.

    Not torch.distributed.nn.functional.all_gather: on gloo its backward scatters with group-local
    ranks as global ranks (torch 2.13), which breaks on any subgroup, e.g. the DP group under TP/PP.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.rows = group, rank, tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.GLOO:  # gloo has no reduce_scatter
            total = grad.clone()
            dist.all_reduce(total, group=ctx.group)
            return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None
        out = grad.new_empty((ctx.rows, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def make_gather(group=None) -> GatherFn:
    """A GatherFn bound to `group`, to hand to the contrastive losses."""
    return functools.partial(gather_with_grad, group=group)
