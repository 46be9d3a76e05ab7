"""The megatron engine's spec: tensor / pipeline / data parallel, validated against the model's shapes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from toolkit.config import RunConfig
from toolkit.distributed.parallel_dims import ParallelDims, init_single_process_group
from toolkit.engines.megatron.engine import MegatronEngine
from toolkit.engines.megatron.validate import validate
from toolkit.engines.spec import EngineSpec, PlannerTraits, register_engine
from toolkit.models.stage_encoder import previous_final
from toolkit.objectives.steps import NEEDS_KIND
from toolkit.run_layout import RunLayout


def export_step(cfg: RunConfig, index: int, step_dir: Path, output: Path) -> Path:
    """Load the sharded checkpoint into one process (tp = pp = 1: dist_checkpointing reshards) and
    write the HF encoder folder, as the engine does at the end of a stage."""
    own_group = not dist.is_initialized()
    init_single_process_group()
    try:
        single = dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, tp=1, pp=1, dp=1, sequence_parallel=False, recompute="none"))
        engine = MegatronEngine(single, ParallelDims(dp=1, world_size=1, rank=0))
        engine.build(add_mask_token=False)
        if index > 0:
            engine.load_stage_output(previous_final(RunLayout.of_stage_dir(step_dir.parent), cfg, index))
        stage = single.stages[index]
        engine.begin_stage(index, stage, data_kind=NEEDS_KIND[stage.objective.kind][0], generator=torch.Generator())
        engine.load(step_dir)
        return engine.end_stage(output)
    finally:
        if own_group:
            dist.destroy_process_group()


SPEC = register_engine(EngineSpec(
    name="megatron", engine_cls=MegatronEngine, parallel_dims=frozenset({"dp", "tp", "pp"}), needs_model_args=True,
    validate=validate, export_step=export_step, async_save=True,
    planner=PlannerTraits(pipeline_micro_batches=True, honours_recompute=True, scores_materialized=True),
))
