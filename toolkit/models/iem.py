"""D2LLM's Interaction Emulation Module: a small MLP that scores a (query, passage) pair from their
pooled embeddings, emulating the teacher's cross-attention.

    x = relu(W1 [y_q ; y_p] + b1);  h = relu(W_sym x + b_sym)  or  relu(W_asym x + b_asym);  z = w2 . h + b2

The symmetric branch serves NLI / STS-like tasks, the asymmetric one retrieval. W1 is kept as its
two halves [W1a | W1b] (two linear modules: every use is a module call, which ZeRO-3 needs to gather
them), so a passage's u_p = W1b y_p is computed once offline and a query's u_q = W1a y_q + b1 once
per query: a pair then costs relu(u_q + u_p), one hidden x hidden matvec and a dot.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class InteractionEmulation(nn.Module):
    def __init__(self, embed_dim: int, hidden: int = 512):
        super().__init__()
        self.embed_dim, self.hidden = embed_dim, hidden
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
        """u_q = W1a y_q + b1 ([..., embed_dim] -> [..., hidden])."""
        return self.w1_query(y_q)

    def passage_proj(self, y_p: Tensor) -> Tensor:
        """u_p = W1b y_p: precomputed per passage, offline."""
        return self.w1_passage(y_p)

    def score_proj(self, u_q: Tensor, u_p: Tensor, symmetric: bool | Tensor) -> tuple[Tensor, Tensor]:
        """(logit z, branch features h) of pairs from projections that broadcast against each other.

        `symmetric` is one flag for all pairs, or a bool tensor broadcasting to the pairs' shape."""
        x = F.relu(u_q + u_p)
        if isinstance(symmetric, bool):
            h = F.relu((self.sym if symmetric else self.asym)(x))
        else:
            h = torch.where(symmetric[..., None], F.relu(self.sym(x)), F.relu(self.asym(x)))
        return self.out(h).squeeze(-1), h

    def forward(self, y_q: Tensor, y_p: Tensor, symmetric: bool | Tensor = False) -> tuple[Tensor, Tensor]:
        """Pairs of query and passage embeddings (broadcasting leading dims) -> (z, h)."""
        return self.score_proj(self.query_proj(y_q), self.passage_proj(y_p), symmetric)

    def flops_per_pair(self) -> int:
        """FLOPs of one pair in the decomposed form (u_q, u_p precomputed): the add, the branch matvec
        and its bias, the output dot (relus not counted)."""
        d = self.hidden
        return d + 2 * d * d + d + 2 * d
