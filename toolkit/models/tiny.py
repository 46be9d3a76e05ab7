"""Tiny random decoder configs/models for tests: real architectures, no downloaded weights."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: every family below supports it
    intermediate_size=128,
    vocab_size=384,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# Per-family extras. head_dim is pinned where the family default (128/256) would dwarf hidden=64.
# Sliding windows stay above the 512 max positions so they never bite unless a test asks for it.
_FAMILY = {
    "llama": {},
    "mistral": dict(sliding_window=1024),
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=1024, query_pre_attn_scalar=16,
                   layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(head_dim=16, sliding_window=1024, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"]),
}

TINY_MODEL_TYPES = tuple(_FAMILY)
_NO_SDPA = frozenset({"gemma2"})  # Gemma2PreTrainedModel._supports_sdpa is False


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """A tiny (~150k parameters) config of `model_type`; `overrides` win over the defaults."""
    if model_type not in _FAMILY:
        raise ValueError(f"tiny_config: unknown model_type {model_type!r}; known: {', '.join(TINY_MODEL_TYPES)}")
    kwargs = {**_COMMON, **_FAMILY[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """Random-init fp32 causal LM in eval mode; same seed and config give the same weights.

    Gemma2 has no sdpa path in transformers (logit softcapping), so "sdpa" falls back to "eager" there.
    """
    cfg = tiny_config(model_type, **overrides)
    if model_type in _NO_SDPA and attn_implementation == "sdpa":
        attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()
