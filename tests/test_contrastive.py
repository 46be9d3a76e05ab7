"""Cosine InfoNCE losses against hand-written references, and the global-batch (gather) convention."""

from __future__ import annotations

import math

import pytest
import torch

from toolkit.objectives.contrastive import info_nce, simcse_loss, supervised_contrastive_loss


def reference_nce(queries, keys, targets, temperature):
    """Per-query loops: -log softmax(cos / T)[target], averaged."""
    total = 0.0
    for q, t in zip(queries, targets):
        scores = [torch.dot(q, k) / (q.norm() * k.norm()) / temperature for k in keys]
        total += -(scores[t] - torch.logsumexp(torch.stack(scores), 0))
    return total / len(queries)


def test_info_nce_matches_reference_and_is_scale_invariant():
    torch.manual_seed(0)
    q, k = torch.randn(5, 8), torch.randn(9, 8)
    t = torch.tensor([0, 3, 8, 2, 2])
    loss = info_nce(q, k, t, 0.05)
    assert torch.allclose(loss, reference_nce(q, k, t, 0.05), atol=1e-5)
    assert torch.allclose(info_nce(3 * q, 0.5 * k, t, 0.05), loss, atol=1e-5)  # cosine: norms do not matter
    assert info_nce(q.bfloat16(), k.bfloat16(), t, 0.05).dtype == torch.float32


def test_simcse_uses_other_views_as_negatives():
    torch.manual_seed(1)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    assert torch.allclose(simcse_loss(a, b), reference_nce(a, b, range(6), 0.05), atol=1e-5)
    perfect = simcse_loss(torch.eye(4), torch.eye(4), temperature=0.05)
    assert perfect.item() < 3 * math.exp(-20) * 1.01  # log(1 + 3 e^-20)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_supervised_keys_are_positives_then_hard_negatives(k):
    torch.manual_seed(2)
    b, d = 4, 8
    q, p, n = torch.randn(b, d), torch.randn(b, d), torch.randn(b, k, d)
    keys = torch.cat([p, n.reshape(b * k, d)])
    ref = reference_nce(q, keys, range(b), 0.02)
    assert torch.allclose(supervised_contrastive_loss(q, p, n, 0.02), ref, atol=1e-4)
    if k == 0:
        assert torch.allclose(supervised_contrastive_loss(q, p, None, 0.02), ref, atol=1e-4)


def test_supervised_rejects_bad_shapes():
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="positives"):
        supervised_contrastive_loss(q, torch.randn(3, 8), None)
    with pytest.raises(ValueError, match="hard_negatives"):
        supervised_contrastive_loss(q, torch.randn(4, 8), torch.randn(4, 8))


def simulated_gather(shards: list[torch.Tensor], rank: int):
    """What gather_with_grad gives rank `rank`: every rank's rows (with grad), and its offset."""
    def gather(x):
        size = x.shape[0]
        # the local slot is x itself; the others are the matching rows of the other ranks
        parts = [x if r == rank else shards[r] for r in range(len(shards))]
        return torch.cat(parts), rank * size
    return gather


@pytest.mark.parametrize("loss_name", ["simcse", "supervised"])
def test_rank_mean_of_local_losses_equals_global_loss_and_gradient(loss_name):
    """Per-rank loss = mean over local queries; averaging losses and grads over ranks = full batch."""
    torch.manual_seed(3)
    world, b, k, d = 3, 4, 2, 8
    q = torch.randn(world * b, d, requires_grad=True)
    p = torch.randn(world * b, d, requires_grad=True)
    n = torch.randn(world * b, k, d, requires_grad=True)

    def loss(q, p, n, gather=None):
        if loss_name == "simcse":
            return simcse_loss(q, p, gather=gather)
        return supervised_contrastive_loss(q, p, n, gather=gather)

    inputs = [q, p] if loss_name == "simcse" else [q, p, n]
    full = loss(q, p, n)
    full_grads = torch.autograd.grad(full, inputs)

    losses = []
    for r in range(world):
        rows = slice(r * b, (r + 1) * b)
        p_shards = list(p.split(b))
        n_shards = [s.reshape(b * k, d) for s in n.split(b)]

        def gather(x, r=r, p_shards=p_shards, n_shards=n_shards):
            shards = p_shards if x.shape[0] == b else n_shards
            return simulated_gather(shards, r)(x)

        losses.append(loss(q[rows], p[rows], n[rows], gather))
    # The real all_gather's backward hands rank r d(sum_r' L_r')/d(rows of r) (a reduce-scatter), so
    # the ranks' gradients together are d(sum_r L_r): DDP's average divides that by the world size.
    rank_grads = torch.autograd.grad(sum(losses), inputs)
    assert torch.allclose(torch.stack(losses).mean(), full, atol=1e-6)
    for g, f in zip(rank_grads, full_grads):
        assert torch.allclose(g / world, f, atol=1e-6)
