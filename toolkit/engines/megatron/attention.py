"""Core attention of the megatron backbones through `torch.nn.functional.scaled_dot_product_attention`.

megatron-core's local `DotProductAttention` materialises the `[b * heads, s, s]` scores (and keeps
them for backward) and repeats K / V to every query head; Transformer Engine's fused attention is
not installed here. SDPA picks the memory-efficient kernel on GPUs (flash takes no mask) and the
fused CPU kernel on CPU, and keeps only log-sum-exp rows for backward. The CPU kernel takes grouped
K / V as they are (`enable_gqa`); on CUDA they are repeated to every query head, as megatron does,
because the masked GPU kernel has no grouped form (the planner counts them query-wide).
The module subclasses megatron's, so its per-partition sizes, softmax scale and dropout
probability are megatron's own; only the forward differs.
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from torch import Tensor


class SDPACoreAttention(DotProductAttention):
    """Bidirectional (key-padding masked) attention on megatron's [s, b, heads, head_dim] layout."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                attn_mask_type=None, attention_bias: Tensor | None = None, packed_seq_params=None) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention: packed sequences and attention bias are not supported")
        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        # V is a view of the fused QKV projection's output (Q and K are RoPE's own outputs): saved
        # as it is, it would keep that whole buffer alive until backward
        v = v.contiguous()
        allowed = None
        if attention_mask is not None:  # megatron's mask: True = masked; SDPA's boolean mask: True = attend
            allowed = ~attention_mask
            # a row with no visible key (an all-padding sample) attends to every key instead of
            # becoming NaN (finite and never read, as megatron's fill value makes it)
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1 and allowed is not None and q.is_cuda:
            # CUDA's memory-efficient kernel (the one that takes a mask) has no grouped K / V, and
            # enable_gqa would fall back to the math kernel's s x s scores: repeat them instead
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            groups = 1
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        dropout = self.attention_dropout.p if self.training else 0.0
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 and not self.config.sequence_parallel
               else contextlib.nullcontext())
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale,
                                                 enable_gqa=groups > 1)
        return out.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)
