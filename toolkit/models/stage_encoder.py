"""A stage's result rebuilt in one process from the run's recipe and the stage's trainable tensors.

A step checkpoint of a LoRA (or small) stage holds only what trained; the rest is the stage's
starting model: base weights, the previous stage's merged encoder, a fresh adapter. Export and the
DeepSpeed engine's stage end rebuild that start here, load the trained tensors and merge.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from toolkit.config import RunConfig
from toolkit.errors import CheckpointError, MissingPathError
from toolkit.models.encoder import Encoder
from toolkit.models.folder import SPEC_FILE, load_encoder_weights, serving_length
from toolkit.models.loading import build_encoder
from toolkit.models.lora import add_lora, merge_lora
from toolkit.run_layout import RunLayout


def previous_final(layout: RunLayout, cfg: RunConfig, index: int) -> Path:
    """The merged encoder of the stage before `index` (stage chaining)."""
    previous = layout.final_dir(index - 1, cfg.stages[index - 1].name)
    if not (previous / SPEC_FILE).is_file():
        raise MissingPathError(f"{previous}: the previous stage's merged model is missing")
    return previous


def merged_stage_encoder(cfg: RunConfig, index: int, layout: RunLayout, tensors: dict[str, torch.Tensor],
                         source: str) -> tuple[Encoder, nn.Module]:
    """Stage `index`'s starting model rebuilt in one process (base weights, previous stage merged, a
    fresh adapter), its trainable `tensors` loaded (names as in `encoder.named_parameters()`), the
    adapter merged: what the stage's training produced, unsharded, with its frozen LM head, encoding at
    the run's serving length (export.max_seq_length), as its folder records."""
    stage = cfg.stages[index]
    needs_mask = any(s.objective.kind == "mntp" and s.objective.mntp.mask_token == "new" for s in cfg.stages)
    encoder, lm_head = build_encoder(cfg.model, cfg.pooling, seed=cfg.seed, add_mask_token=needs_mask)
    if index > 0:
        load_encoder_weights(encoder, previous_final(layout, cfg, index))
    if stage.objective.kind == "d2llm":
        encoder.add_iem(stage.objective.d2llm.iem_hidden, stage.objective.d2llm.cosine_scale)  # weights: `tensors`
    if stage.lora.enabled:
        encoder.backbone = add_lora(encoder.backbone, stage.lora)
    params = dict(encoder.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise CheckpointError(f"{source}: tensors {unknown[:3]} do not exist in the rebuilt model")
    with torch.no_grad():
        for name, value in tensors.items():
            if value.shape != params[name].shape:
                raise CheckpointError(f"{source}: tensor {name} has shape {tuple(value.shape)}, the model expects "
                                  f"{tuple(params[name].shape)}")
            params[name].copy_(value)
    encoder.backbone = merge_lora(encoder.backbone)
    encoder.spec.max_length = serving_length(cfg, encoder.backbone.config)  # what its folder records
    return encoder, lm_head
