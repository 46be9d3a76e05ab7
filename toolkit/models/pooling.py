"""Pooling heads: token states [b, s, d] -> one vector per text.

Every head takes two masks. `attention_mask` marks real tokens (1) vs padding (0). `embed_mask` marks
the tokens that may be pooled: real tokens minus the instruction prefix, so instructions steer the
representation (they are attended to) without being averaged into it. Heads work for left and right
padding alike and compute in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.config import ConfigError, PoolingConfig
from toolkit.errors import InputError

POOLING_MODES = ("mean", "weighted_mean", "last", "bos", "latent_attention", "pma")


def _masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _check_nonempty(embed_mask: Tensor) -> None:
    if bool((embed_mask.sum(1) == 0).any()):
        raise InputError(
            "pooling: a text has no poolable token (empty text, or the instruction filled max_length); "
            "shorten the instruction or raise model.max_length"
        )


class MeanPooling(nn.Module):
    def forward(self, hidden: Tensor, attention_mask: Tensor, embed_mask: Tensor) -> Tensor:
        return _masked_mean(hidden.float(), embed_mask)


class WeightedMeanPooling(nn.Module):
    """Position-weighted mean (SGPT / LLM2Vec): the k-th pooled token has weight k.

    Later tokens have seen more context in a causal model; weights count pooled tokens only, so
    padding side and instruction length do not change them.
    """

    def forward(self, hidden: Tensor, attention_mask: Tensor, embed_mask: Tensor) -> Tensor:
        m = embed_mask.to(torch.float32)
        weights = (torch.cumsum(m, dim=1) * m).unsqueeze(-1)
        return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


class LastTokenPooling(nn.Module):
    """State of the last poolable token (the EOS position when the tokenizer appends one)."""

    def forward(self, hidden: Tensor, attention_mask: Tensor, embed_mask: Tensor) -> Tensor:
        positions = torch.arange(embed_mask.shape[1], device=embed_mask.device)
        last = torch.where(embed_mask.bool(), positions, -1).max(dim=1).values
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


class BosPooling(nn.Module):
    """State of the first real token (BOS when the tokenizer adds one), whatever the padding side."""

    def forward(self, hidden: Tensor, attention_mask: Tensor, embed_mask: Tensor) -> Tensor:
        first = attention_mask.to(torch.int64).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first].float()


def _split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


class LatentAttentionPooling(nn.Module):
    """NV-Embed latent attention: token states query a learned latent array, then MLP + masked mean."""

    def __init__(self, hidden_size: int, num_latents: int = 512, heads: int = 8):
        super().__init__()
        if hidden_size % heads:
            raise ConfigError(f"pooling.heads={heads} must divide the hidden size {hidden_size}")
        self.heads = heads
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size) * 0.02)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.kv_proj = nn.Linear(hidden_size, 2 * hidden_size, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, hidden: Tensor, attention_mask: Tensor, embed_mask: Tensor) -> Tensor:
        x = hidden.to(self.latents.dtype)
        b = x.shape[0]
        q = _split_heads(self.q_proj(x), self.heads)
        k, v = self.kv_proj(self.latents).unsqueeze(0).expand(b, -1, -1).chunk(2, dim=-1)
        attn = F.scaled_dot_product_attention(q, _split_heads(k, self.heads), _split_heads(v, self.heads))
        attn = self.out_proj(attn.transpose(1, 2).reshape(x.shape))
        return _masked_mean(self.mlp(attn).float(), embed_mask)


class PMAPooling(nn.Module):
    """Pooling by Multihead Attention (Set Transformer; D2LLM's student head).

    O = S + MultiHead(S Wq, X Wk, X Wv) with the key-padding mask; H1 = LN(O);
    y = LN(H1 + relu(H1 Wo + bo)). Scores are scaled per head by sqrt(d / H), not sqrt(d) as the
    D2LLM reference does. With k seeds the k outputs are concatenated ([b, k*d]).
    """

    def __init__(self, hidden_size: int, heads: int = 8, num_seeds: int = 1):
        super().__init__()
        if hidden_size % heads:
            raise ConfigError(f"pooling.heads={heads} must divide the hidden size {hidden_size}")
        self.heads = heads
        self.seeds = nn.Parameter(torch.randn(num_seeds, hidden_size) / math.sqrt(hidden_size))
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.ffn = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, hidden: Tensor, attention_mask: Tensor, embed_mask: Tensor) -> Tensor:
        x = hidden.to(self.seeds.dtype)
        b = x.shape[0]
        seeds = self.seeds.unsqueeze(0).expand(b, -1, -1)
        q = _split_heads(self.q_proj(seeds), self.heads)
        k = _split_heads(self.k_proj(x), self.heads)
        v = _split_heads(self.v_proj(x), self.heads)
        keep = embed_mask.bool()[:, None, None, :]  # [b, 1, 1, s]; True = attend
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # scale 1/sqrt(d/H)
        o = seeds + attn.transpose(1, 2).reshape(seeds.shape)
        h1 = self.norm1(o)
        y = self.norm2(h1 + F.relu(self.ffn(h1)))
        return y.reshape(b, -1).float()


class Pooling(nn.Module):
    """The configured head plus the empty-text check; `output_dim` is the embedding size."""

    def __init__(self, cfg: PoolingConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.hidden_size = hidden_size
        if cfg.mode == "mean":
            self.head: nn.Module = MeanPooling()
        elif cfg.mode == "weighted_mean":
            self.head = WeightedMeanPooling()
        elif cfg.mode == "last":
            self.head = LastTokenPooling()
        elif cfg.mode == "bos":
            self.head = BosPooling()
        elif cfg.mode == "latent_attention":
            self.head = LatentAttentionPooling(hidden_size, cfg.num_latents, cfg.heads)
        elif cfg.mode == "pma":
            self.head = PMAPooling(hidden_size, cfg.heads, cfg.num_seeds)
        else:
            raise ConfigError(f"pooling.mode={cfg.mode!r} is not one of {POOLING_MODES}")
        self.output_dim = hidden_size * (cfg.num_seeds if cfg.mode == "pma" else 1)

    @property
    def has_parameters(self) -> bool:
        return any(True for _ in self.parameters())

    def forward(self, hidden: Tensor, attention_mask: Tensor, embed_mask: Tensor) -> Tensor:
        _check_nonempty(embed_mask)
        return self.head(hidden, attention_mask, embed_mask)


def exclude_prefix(attention_mask: Tensor, prefix_length: int) -> Tensor:
    """Embed mask: real tokens minus the first `prefix_length` real tokens (the instruction).

    Same semantics as sentence-transformers' `include_prompt=False`, for left or right padding, so an
    exported folder pools exactly like the Encoder.
    """
    if not prefix_length:
        return attention_mask
    real = attention_mask.to(torch.int64)
    rank = torch.cumsum(real, dim=1)  # 1-based index among real tokens
    return (real.bool() & (rank > prefix_length)).to(attention_mask.dtype)
