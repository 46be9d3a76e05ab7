"""The losses that fine-tune the D2LLM teacher (`objective.kind: teacher`, `steps.TeacherStep`): the
yes/no cross-encoder on (query, candidate) pairs with hard negatives.

Each sample's candidates are [positive] + negatives, each rendered with the prompt the teacher is
scored with (`toolkit.models.yes_no`: same templates, chat template, truncation, answer tokens); the
causal backbone reads every prompt and the logit of a pair is

    l = (z_yes - z_no) / T = h_last . (W[yes] - W[no]) / T,      s = sigmoid(l)

with the LM head frozen (only its yes and no rows are read). Pointwise: binary cross-entropy of s
against 1 for the positive and 0 for each negative, averaged over the batch's pairs. Listwise: for
each query, cross-entropy of the softmax over its candidates' logits with the positive as the target,
averaged over the queries (a query with fewer negatives has the missing ones masked out).

Under data parallelism each rank takes the mean over its own pairs / queries and the gradients are
averaged over ranks (both engines alike, as for every objective): with equal batches per rank that is
the global mean; ranks holding different numbers of pairs (token-budget batches, uneven negatives)
weight theirs by rank, not by pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pointwise_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean binary cross-entropy of sigmoid(logits) against 0 / 1 labels, over all pairs."""
    return F.binary_cross_entropy_with_logits(logits, labels)


def listwise_loss(logits: Tensor, valid: Tensor) -> Tensor:
    """Mean over queries of -log softmax(logits[q])[0] (column 0: the positive), invalid columns masked."""
    return F.cross_entropy(logits.masked_fill(~valid, float("-inf")), torch.zeros(len(logits), dtype=torch.long,
                                                                                  device=logits.device))
