"""D2LLM distillation losses: the student's IEM logits z learn from the teacher's scores s.

Notation (one batch of B queries, each with its positive and K hard negatives):
- `z_cand`, `s_cand` [B, 1+K]: student logits and teacher scores (in (0, 1)) of each query's own
  candidates, positive first;
- `z_inb`, `s_inb` [B, B]: query i against the positive of query j (the diagonal is i's own positive);
- `h_cand` [B, 1+K, H] / `t_cand` [B, 1+K, D]: student IEM features and teacher features of the
  candidates (feature imitation).

Every softmax is a log-sum-exp (the reference's hand-written softmax overflows); each loss is the
mean over queries. METHODS.md section 2.3 has the formulas; the weights are `D2LLMConfig`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from toolkit.config import D2LLMConfig


def in_batch_infonce(z_inb: Tensor, temperature: float = 1.0) -> Tensor:
    """-log softmax_j(z_ij / T) at j = i: each query against every positive of the batch."""
    labels = torch.arange(z_inb.shape[0], device=z_inb.device)
    return F.cross_entropy(z_inb.float() / temperature, labels)


def contrastive_imitation(z_cand: Tensor, s_cand: Tensor, temperature: float = 1.0) -> Tensor:
    """Teacher-weighted InfoNCE over positive + hard negatives: logits w * z with w = s for the
    positive and 1 - s for each negative, -log softmax at the positive."""
    w = torch.cat([s_cand[:, :1], 1.0 - s_cand[:, 1:]], dim=1).float()
    logits = w * z_cand.float() / temperature
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def pearson_rank_imitation(z_cand: Tensor, s_cand: Tensor, eps: float = 1e-8) -> Tensor:
    """1 - Pearson correlation of each query's student logits and teacher scores (needs K >= 1)."""
    if z_cand.shape[1] < 2:
        raise ValueError("rank imitation needs at least one hard negative per query (candidates >= 2)")
    z = z_cand.float() - z_cand.float().mean(dim=1, keepdim=True)
    s = s_cand.float() - s_cand.float().mean(dim=1, keepdim=True)
    corr = (z * s).sum(1) / (z.norm(dim=1) * s.norm(dim=1)).clamp_min(eps)
    return (1.0 - corr).mean()


def pairwise_rank_imitation(z_cand: Tensor, s_cand: Tensor, z_inb: Tensor, s_inb: Tensor,
                            known: Tensor | None = None) -> Tensor:
    """For hard negative k of query i and in-batch negative j != i:
    max(0, s_ik - s_ij) * -log sigmoid(z_ik - z_ij), averaged over (i, k, j).

    `known` [B, B] marks the (i, j) whose teacher score s_ij exists (the teacher scores in-batch pairs
    of its planned groups; a batch that mixes groups knows only some); the rest are left out."""
    b, c = z_cand.shape
    if c < 2 or b < 2:
        raise ValueError("pairwise rank imitation needs hard negatives and at least 2 queries per batch")
    off = ~torch.eye(b, dtype=torch.bool, device=z_inb.device)
    mask = off if known is None else off & known.to(off.device)
    z_hard, s_hard = z_cand[:, 1:, None].float(), s_cand[:, 1:, None].float()  # [B, K, 1]
    z_neg, s_neg = z_inb.float()[:, None, :], s_inb.float()[:, None, :]  # [B, 1, B]
    weight = (s_hard - s_neg).clamp_min(0.0) * mask[:, None, :]
    terms = weight * F.softplus(-(z_hard - z_neg))  # softplus(-x) = -log sigmoid(x), stably
    count = mask.sum() * (c - 1)
    return terms.sum() / count.clamp_min(1)


def feature_imitation(h_cand: Tensor, t_cand: Tensor) -> Tensor:
    """Squared Frobenius distance between the student's and the teacher's candidate-by-candidate
    cosine-similarity matrices, per query, averaged."""
    def cos(x: Tensor) -> Tensor:
        x = F.normalize(x.float(), dim=-1)
        return x @ x.transpose(1, 2)

    return (cos(h_cand) - cos(t_cand)).pow(2).sum(dim=(1, 2)).mean()


def d2llm_loss(z_cand: Tensor, s_cand: Tensor, z_inb: Tensor, s_inb: Tensor | None, weights: D2LLMConfig,
               h_cand: Tensor | None = None, t_cand: Tensor | None = None,
               known: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The weighted sum and its parts; a term whose weight is 0 is not computed, one whose inputs are
    missing (no in-batch teacher scores, no teacher features) fails unless its weight is 0."""
    parts: dict[str, Tensor] = {}
    if weights.in_batch:
        parts["in_batch"] = in_batch_infonce(z_inb, weights.temperature)
    if weights.contrastive:
        parts["contrastive"] = contrastive_imitation(z_cand, s_cand, weights.temperature)
    if weights.rank_pearson:
        parts["rank_pearson"] = pearson_rank_imitation(z_cand, s_cand)
    if weights.rank_pairwise:
        if s_inb is None:
            raise ValueError("rank_pairwise needs the teacher's in-batch scores (score the planned batches)")
        parts["rank_pairwise"] = pairwise_rank_imitation(z_cand, s_cand, z_inb, s_inb, known)
    if weights.feature:
        if h_cand is None or t_cand is None:
            raise ValueError("feature imitation needs teacher features in the scored shards (or weight 0)")
        parts["feature"] = feature_imitation(h_cand, t_cand)
    if not parts:
        raise ValueError("every D2LLM loss weight is 0")
    total = sum(getattr(weights, name) * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}
