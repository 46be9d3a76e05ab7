"""The IEM's starting point on anisotropic inputs.

Pooled LLM embeddings share a large common component (60-90% of their energy on the D2LLM quickstart).
With independently initialised halves W1a, W1b that component dominates u_q + u_p: the first ReLUs are
on (or off) for all of a query's candidates, the module starts as an additive f(q) + g(p), and every
query ranks a shared candidate set the same way (a passage prior; on the quickstart it stayed one:
held-out IEM scores matched the query-free scores at Spearman 0.99). The difference init W1b = -W1a
cancels the common component: a fresh IEM scores features of y_q - y_p.
"""

from __future__ import annotations

import torch

from toolkit.models.iem import InteractionEmulation


def _anisotropic(n_q: int, n_p: int, d: int, common_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    common = torch.randn(d, generator=g)
    common = common / common.norm() * common_norm  # noise norm ~ sqrt(d)
    return common + torch.randn(n_q, d, generator=g), common + torch.randn(n_p, d, generator=g)


def _rank_agreement(z: torch.Tensor) -> float:
    """Mean Spearman, over pairs of queries, of their rankings of the same candidates [queries, candidates]."""
    r = z.argsort(1).argsort(1).double()
    r -= r.mean(1, keepdim=True)
    c = (r @ r.T) / (r.norm(dim=1)[:, None] * r.norm(dim=1)[None])
    return float(c[~torch.eye(len(z), dtype=torch.bool)].mean())


def test_fresh_iem_ignores_a_component_shared_by_queries_and_passages():
    d = 64
    torch.manual_seed(0)
    iem = InteractionEmulation(d, 128)
    q, p = _anisotropic(8, 16, d, 0.0)
    shift = torch.randn(d, generator=torch.Generator().manual_seed(1)) * 3.0
    with torch.no_grad():
        z, _ = iem(q[:, None], p[None])
        z_shifted, _ = iem((q + shift)[:, None], (p + shift)[None])
    assert torch.allclose(z, z_shifted, atol=1e-5)
    assert torch.equal(iem.w1_passage.weight, -iem.w1_query.weight)


def test_fresh_iem_is_not_additive_on_anisotropic_embeddings():
    """A shared component (~86% of the energy) must not make every query rank the candidates alike."""
    d = 64
    q_iso, p_iso = _anisotropic(16, 32, d, 0.0)
    q, p = _anisotropic(16, 32, d, 20.0)
    torch.manual_seed(0)
    iem = InteractionEmulation(d, 128)
    with torch.no_grad():
        z_iso, _ = iem(q_iso[:, None], p_iso[None])
        z, _ = iem(q[:, None], p[None])
        gate = (iem.query_proj(q)[:, None] + iem.passage_proj(p)[None]) > 0  # [queries, candidates, hidden]
    mixed = float((gate.any(1) & ~gate.all(1)).float().mean())  # units whose gate depends on the candidate
    assert mixed > 0.8
    assert _rank_agreement(z) < _rank_agreement(z_iso) + 0.05
