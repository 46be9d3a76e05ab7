"""Build a trainable Encoder (+ the LM head MNTP needs) from a model path or packaged asset."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ContextManager

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from toolkit.assets import resolve_model_path
from toolkit.config import ConfigError, ModelConfig, PoolingConfig
from toolkit.models.bidirectional import check_bidirectional, make_bidirectional
from toolkit.models.encoder import Encoder, prepare_tokenizer
from toolkit.models.folder import EncoderSpec
from toolkit.models.pooling import Pooling
from toolkit.objectives.mntp import resolve_mask_token

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_causal_lm(cfg: ModelConfig, bidirectional: bool | None = None):
    """(causal LM, tokenizer) from `cfg.path`, bidirectional unless told otherwise."""
    path = resolve_model_path(cfg.path)
    hf_cfg = AutoConfig.from_pretrained(path)
    if cfg.attention_dropout is not None:
        hf_cfg.attention_dropout = cfg.attention_dropout
    if cfg.bidirectional if bidirectional is None else bidirectional:
        make_bidirectional(hf_cfg)
    model = AutoModelForCausalLM.from_pretrained(
        path, config=hf_cfg, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation
    )
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    return model, tokenizer


def build_encoder(
    model_cfg: ModelConfig,
    pooling_cfg: PoolingConfig,
    seed: int = 0,
    bidirectional: bool | None = None,
    add_mask_token: bool = False,
    partitioned: Callable[[list[nn.Parameter]], ContextManager] | None = None,
) -> tuple[Encoder, nn.Module]:
    """Encoder over the causal LM's decoder, and the (frozen) LM head kept for MNTP.

    `add_mask_token` adds a new `<mask>` token (MNTP `mask_token: new`) and resizes the embeddings
    before the decoder is split off. `partitioned` (DeepSpeed ZeRO-3: the model was loaded already
    partitioned over the ranks) gathers full parameters for the frozen copy of a tied head; the
    bidirectional proof is then left to the caller, since a partitioned model only runs inside its engine.
    """
    causal, tokenizer = load_causal_lm(model_cfg, bidirectional)
    if add_mask_token:
        if resolve_mask_token(tokenizer, "new")[1]:
            causal.resize_token_embeddings(len(tokenizer))
    bidir = model_cfg.bidirectional if bidirectional is None else bidirectional
    backbone = causal.get_decoder()
    if bidir and partitioned is None:
        check_bidirectional(backbone)
    lm_head = causal.get_output_embeddings()
    if lm_head.weight is backbone.get_input_embeddings().weight:
        # Tied embeddings: the MNTP head is a frozen copy, so full fine-tuning trains the input
        # embeddings without moving the head (as on the megatron engine, where stages hold them apart).
        with (partitioned or (lambda _: contextlib.nullcontext()))([lm_head.weight]):
            lm_head.weight = nn.Parameter(lm_head.weight.detach().clone(), requires_grad=False)
    lm_head.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pooling = Pooling(pooling_cfg, backbone.config.hidden_size)
    spec = EncoderSpec(pooling=pooling_cfg, max_length=model_cfg.max_length, bidirectional=bidir)
    return Encoder(backbone, tokenizer, pooling, spec), lm_head


def set_attention_dropout(model: nn.Module, p: float) -> int:
    """Set the attention-probability dropout of every attention module (HF reads it per forward)."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"attention_dropout={p} must be in [0, 1)")
    changed = 0
    for module in model.modules():
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, float):
            module.attention_dropout = p
            changed += 1
    if changed == 0:
        raise ConfigError(f"{type(model).__name__}: no attention module exposes attention_dropout")
    return changed
