"""D2LLM's Interaction Emulation Module: a small MLP that scores a (query, passage) pair from their
pooled embeddings, emulating the teacher's cross-attention.

    x = relu(W1 [y_q ; y_p] + b1);  h = relu(W_sym x + b_sym)  or  relu(W_asym x + b_asym);  z = w2 . h + b2

The symmetric branch serves NLI / STS-like tasks, the asymmetric one retrieval. W1 is kept as its
two halves [W1a | W1b] (two linear modules: every use is a module call, which ZeRO-3 needs to gather
them), so a passage's u_p = W1b y_p is computed once offline and a query's u_q = W1a y_q + b1 once
per query: a pair then costs relu(u_q + u_p), one hidden x hidden matvec and a dot.

With `cosine_scale` c > 0 (not in the paper; d2llm.cosine_scale) the score adds a cosine skip,
z = w2 . h + b2 + c cos(y_q, y_p): the student starts as the bi-encoder the in-batch term trains and
the MLP learns the teacher's corrections to it, instead of a similarity from scratch. The projections
then carry the unit embedding after the hidden units (u_q = [W1a y_q + b1 ; c y_q/|y_q|], u_p =
[W1b y_p ; y_p/|y_p|]), so every decomposed use is unchanged and a pair costs one more d-dim dot.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class InteractionEmulation(nn.Module):
    def __init__(self, embed_dim: int, hidden: int = 512, cosine_scale: float = 0.0):
        super().__init__()
        self.embed_dim, self.hidden, self.cosine_scale = embed_dim, hidden, float(cosine_scale)
        self.w1_query = nn.Linear(embed_dim, hidden)  # W1a, b1
        self.w1_passage = nn.Linear(embed_dim, hidden, bias=False)  # W1b
        self.sym = nn.Linear(hidden, hidden)
        self.asym = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)
        # Difference init: W1b = -W1a, so that at the start x = relu(W1a (y_q - y_p) + b1). Pooled LLM
        # embeddings share a large common component (here 60-90% of their energy); with independent
        # halves it dominates u_q + u_p, every ReLU is on (or off) for all of a query's candidates, the
        # IEM starts as an additive f(q) + g(p) and ranks each query's candidates by a passage prior.
        # The difference cancels the shared component and starts from features of y_q - y_p (their
        # distance); training moves both halves freely and the decomposed form is unchanged.
        with torch.no_grad():
            self.w1_passage.weight.copy_(-self.w1_query.weight)

    # ---------------------------------------------------------------- decomposed (fast) form
    def query_proj(self, y_q: Tensor) -> Tensor:
        """u_q = W1a y_q + b1 ([..., embed_dim] -> [..., hidden]; + embed_dim with the cosine skip)."""
        u = self.w1_query(y_q)
        if not self.cosine_scale:
            return u
        return torch.cat([u, self.cosine_scale * F.normalize(y_q, dim=-1)], dim=-1)

    def passage_proj(self, y_p: Tensor) -> Tensor:
        """u_p = W1b y_p: precomputed per passage, offline (+ the unit embedding with the cosine skip)."""
        return self.passage_proj_from(self.w1_passage(y_p), y_p)

    def passage_proj_from(self, w1b_y_p: Tensor, y_p: Tensor | None) -> Tensor:
        """u_p from a stored W1b y_p and the passage's embedding (an index keeps the embeddings anyway,
        so it stores only the hidden units; y_p is needed only with the cosine skip)."""
        if not self.cosine_scale:
            return w1b_y_p
        return torch.cat([w1b_y_p, F.normalize(y_p, dim=-1)], dim=-1)

    def score_proj(self, u_q: Tensor, u_p: Tensor, symmetric: bool | Tensor) -> tuple[Tensor, Tensor]:
        """(logit z, branch features h) of pairs from projections that broadcast against each other.

        `symmetric` is one flag for all pairs, or a bool tensor broadcasting to the pairs' shape."""
        skip = None
        if self.cosine_scale:  # the scaled unit embeddings ride after the hidden units
            # a contraction, not (a * b).sum(-1): no [pairs, embed_dim] temporary over a corpus block
            skip = torch.einsum("...d,...d->...", u_q[..., self.hidden:], u_p[..., self.hidden:])
            u_q, u_p = u_q[..., : self.hidden], u_p[..., : self.hidden]
        x = F.relu(u_q + u_p)
        if isinstance(symmetric, bool):
            h = F.relu((self.sym if symmetric else self.asym)(x))
        else:
            h = torch.where(symmetric[..., None], F.relu(self.sym(x)), F.relu(self.asym(x)))
        z = self.out(h).squeeze(-1)
        return (z if skip is None else z + skip), h

    def forward(self, y_q: Tensor, y_p: Tensor, symmetric: bool | Tensor = False) -> tuple[Tensor, Tensor]:
        """Pairs of query and passage embeddings (broadcasting leading dims) -> (z, h)."""
        return self.score_proj(self.query_proj(y_q), self.passage_proj(y_p), symmetric)

    def flops_per_pair(self) -> int:
        """FLOPs of one pair in the decomposed form (u_q, u_p precomputed): the add, the branch matvec
        and its bias, the output dot, and the cosine skip's dot and add (relus not counted)."""
        d = self.hidden
        return d + 2 * d * d + d + 2 * d + (2 * self.embed_dim + 1 if self.cosine_scale else 0)
