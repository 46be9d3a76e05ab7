"""gather_with_grad across 2 gloo processes: the sharded loss and gradient equal the full-batch ones.

Convention checked: each rank's loss is the mean over its LOCAL queries against the GLOBAL keys; the
mean of the rank losses equals the full-batch loss, and the MEAN of the rank gradients (what DDP's
all-reduce produces) equals the full-batch gradient; their sum is world_size times it.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.helpers import free_port
from toolkit.distributed.gather import gather_with_grad, make_gather
from toolkit.objectives.contrastive import simcse_loss, supervised_contrastive_loss
from toolkit.objectives.gradcache import gradcache_backward

WORLD, B, K, D_IN, D = 2, 4, 2, 16, 8


def test_without_process_group_is_identity():
    x = torch.randn(3, 4)
    out, offset = gather_with_grad(x)
    assert out is x and offset == 0
    assert make_gather(None)(x)[0] is x


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / WORLD


def _check_against_full_batch(rank: int, layer: nn.Linear, data, loss_name: str, gather, chunk: int = 0):
    xq, xp, xn = data  # full batch, identical on every rank

    def loss_fn(q, p, n=None, gather=None):
        if loss_name == "simcse":
            return simcse_loss(q, p, 0.05, gather=gather)
        return supervised_contrastive_loss(q, p, n.view(q.shape[0], K, D), 0.02, gather=gather)

    full = loss_fn(layer(xq), layer(xp), layer(xn.flatten(0, 1)))
    full_grads = torch.autograd.grad(full, list(layer.parameters()))

    rows = slice(rank * B, (rank + 1) * B)
    local = [xq[rows], xp[rows], xn[rows].flatten(0, 1)]
    if chunk:  # GradCache with a gathering loss: phase-2 backward runs the collective on all ranks
        loss = gradcache_backward(lambda g: layer(g["x"]), [{"x": x} for x in local],
                                  lambda *e: loss_fn(*e, gather=gather), chunk)
    else:
        loss = loss_fn(*[layer(x) for x in local], gather=gather)
        loss.backward()
    assert torch.allclose(_mean_over_ranks(loss), full.detach(), atol=1e-6)
    for p, f in zip(layer.parameters(), full_grads):
        averaged = _mean_over_ranks(p.grad)  # what DDP's all-reduce leaves in .grad
        assert torch.allclose(averaged, f, atol=1e-6), (averaged - f).abs().max()
        assert not torch.allclose(p.grad, f, atol=1e-6)  # a single rank's gradient alone is not it
    layer.zero_grad(set_to_none=True)


def _worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # same weights and same full batch on both ranks
        layer = nn.Linear(D_IN, D)
        data = (torch.randn(WORLD * B, D_IN), torch.randn(WORLD * B, D_IN), torch.randn(WORLD * B, K, D_IN))
        pair = dist.new_group([0, 1])
        singles = [dist.new_group([0]), dist.new_group([1])]  # every rank must create every group
        for gather in (make_gather(None), make_gather(pair)):
            for loss_name in ("simcse", "supervised"):
                _check_against_full_batch(rank, layer, data, loss_name, gather)
                _check_against_full_batch(rank, layer, data, loss_name, gather, chunk=3)

        x = torch.randn(B, D) + rank
        out, offset = gather_with_grad(x, singles[rank])  # a passed group is honoured, not the world
        assert out is x and offset == 0
        out, offset = gather_with_grad(x)
        assert out.shape == (WORLD * B, D) and offset == rank * B and torch.equal(out[offset : offset + B], x)
        empty, _ = gather_with_grad(torch.randn(0, D))  # k = 0 hard negatives still line up
        assert empty.shape == (0, D)

        try:
            gather_with_grad(torch.randn(B + rank, D))
        except ValueError as e:
            assert "same shape on every rank" in str(e) and "(4, 8), (5, 8)" in str(e)
        else:
            raise AssertionError("unequal local batches must raise")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_gather_equals_full_batch():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)
