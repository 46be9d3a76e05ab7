"""Turn a run, a finished stage or a mid-stage `step-N/` checkpoint into an Encoder folder.

A step checkpoint holds only the trainable tensors (adapter + pooling head); consolidation rebuilds
the stage's starting model from the run's saved config (base weights, previous stage merged), loads
those tensors, merges the adapter and writes a sentence-transformers folder.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from toolkit.atomic import atomic_dir
from toolkit.checkpoint.manager import COMPLETE, read_meta
from toolkit.config import RunConfig, load_config
from toolkit.models.encoder import Encoder
from toolkit.models.folder import SPEC_FILE, load_encoder_weights

STAGE_RE = re.compile(r"^(\d+)-(.+)$")


def finished_stages(run_dir: Path) -> list[Path]:
    finals = [d / "final" for d in sorted(run_dir.iterdir()) if STAGE_RE.match(d.name) and (d / "final" / SPEC_FILE).is_file()]
    return finals


def consolidate(source: Path, output: Path) -> Path:
    """Write an Encoder folder for `source` (run dir, stage dir, stage `final/`, or `step-N/`)."""
    source = Path(source)
    if (source / SPEC_FILE).is_file():  # already an encoder folder
        with atomic_dir(output) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        return output
    if (source / COMPLETE).is_file():
        return _from_step(source, output)
    if (source / "config.yaml").is_file():  # a run directory: its newest finished stage
        finals = finished_stages(source)
        if not finals:
            raise FileNotFoundError(f"{source}: no finished stage yet; export a step checkpoint (…/NN-stage/step-N) instead")
        return consolidate(finals[-1], output)
    if STAGE_RE.match(source.name) and (source / "final" / SPEC_FILE).is_file():
        return consolidate(source / "final", output)
    raise FileNotFoundError(
        f"{source}: not an encoder folder, a run directory (config.yaml), a stage directory or a complete step-N checkpoint"
    )


def _from_step(step_dir: Path, output: Path) -> Path:
    stage_dir, run_dir = step_dir.parent, step_dir.parent.parent
    match = STAGE_RE.match(stage_dir.name)
    if not match or not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{step_dir}: expected <run>/<NN>-<stage>/step-N with <run>/config.yaml")
    cfg: RunConfig = load_config(run_dir / "config.yaml")
    index = int(match.group(1))
    if index >= len(cfg.stages) or cfg.stages[index].name != match.group(2):
        raise ValueError(f"{step_dir}: stage {stage_dir.name} is not in {run_dir / 'config.yaml'}")
    engine = read_meta(step_dir).get("engine", "hf")
    if engine == "megatron":
        return _from_megatron_step(cfg, index, step_dir, output)
    if engine == "deepspeed":
        from toolkit.engines.deepspeed_zero import read_trainable

        tensors = read_trainable(step_dir)
    else:
        trainable = step_dir / "trainable.safetensors"
        if not trainable.is_file():
            raise FileNotFoundError(f"{trainable}: missing from a checkpoint marked complete")
        tensors = load_file(str(trainable))
    return merged_stage_encoder(cfg, index, run_dir, tensors, source=str(step_dir)).save_pretrained(output)


def merged_stage_encoder(cfg: RunConfig, index: int, run_dir: Path, tensors: dict[str, torch.Tensor],
                         source: str) -> Encoder:
    """Stage `index`'s starting model rebuilt in one process (base weights, previous stage merged, a
    fresh adapter), its trainable `tensors` loaded (names as in `encoder.named_parameters()`), the
    adapter merged: what the stage's training produced, unsharded."""
    from toolkit.models.loading import build_encoder
    from toolkit.models.lora import add_lora, merge_lora

    stage = cfg.stages[index]
    needs_mask = any(s.objective.kind == "mntp" and s.objective.mntp.mask_token == "new" for s in cfg.stages)
    encoder, _ = build_encoder(cfg.model, cfg.pooling, seed=cfg.seed, add_mask_token=needs_mask)
    if index > 0:
        load_encoder_weights(encoder, _previous_final(run_dir, cfg, index))
    if stage.objective.kind == "d2llm":
        encoder.add_iem(stage.objective.d2llm.iem_hidden)  # its trained weights are among `tensors`
    if stage.lora.enabled:
        encoder.backbone = add_lora(encoder.backbone, stage.lora)
    params = dict(encoder.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"{source}: tensors {unknown[:3]} do not exist in the rebuilt model")
    with torch.no_grad():
        for name, value in tensors.items():
            if value.shape != params[name].shape:
                raise ValueError(f"{source}: tensor {name} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(params[name].shape)}")
            params[name].copy_(value)
    encoder.backbone = merge_lora(encoder.backbone)
    return encoder


def _previous_final(run_dir: Path, cfg: RunConfig, index: int) -> Path:
    previous = run_dir / f"{index - 1:02d}-{cfg.stages[index - 1].name}" / "final"
    if not (previous / SPEC_FILE).is_file():
        raise FileNotFoundError(f"{previous}: the previous stage's merged model is missing")
    return previous


def _from_megatron_step(cfg: RunConfig, index: int, step_dir: Path, output: Path) -> Path:
    """Load the sharded checkpoint into one process (tp = pp = 1: dist_checkpointing reshards) and
    write the HF encoder folder, as the engine does at the end of a stage."""
    import dataclasses

    import torch.distributed as dist

    from toolkit.distributed.parallel_dims import ParallelDims, init_single_process_group
    from toolkit.engines.megatron.engine import MegatronEngine
    from toolkit.objectives.steps import NEEDS_KIND

    own_group = not dist.is_initialized()
    init_single_process_group()
    try:
        single = dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, tp=1, pp=1, dp=1, sequence_parallel=False, recompute="none"))
        engine = MegatronEngine(single, ParallelDims(dp=1, world_size=1, rank=0))
        engine.build(add_mask_token=False)
        if index > 0:
            engine.load_stage_output(_previous_final(step_dir.parent.parent, cfg, index))
        stage = single.stages[index]
        engine.begin_stage(index, stage, data_kind=NEEDS_KIND[stage.objective.kind][0], generator=torch.Generator())
        engine.load(step_dir)
        return engine.end_stage(output)
    finally:
        if own_group:
            dist.destroy_process_group()
