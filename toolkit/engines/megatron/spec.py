"""The megatron engine's spec: tensor / pipeline / data parallel, validated against the model's shapes."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from toolkit.config import RunConfig
from toolkit.distributed.parallel_dims import init_single_process_group
from toolkit.engines.megatron.engine import MegatronEngine
from toolkit.engines.megatron.step_export import export_step_streaming
from toolkit.engines.megatron.validate import validate
from toolkit.engines.spec import EngineSpec, PlannerTraits, register_engine


def export_step(cfg: RunConfig, index: int, step_dir: Path, output: Path) -> Path:
    """Stream the sharded checkpoint into the HF encoder folder in one process, unit by unit
    (`step_export`): any saved TP / PP layout, never the whole model in memory."""
    own_group = not dist.is_initialized()
    init_single_process_group()  # dist_checkpointing's reader needs a process group (of one)
    try:
        return export_step_streaming(cfg, index, step_dir, output)
    finally:
        if own_group:
            dist.destroy_process_group()


SPEC = register_engine(EngineSpec(
    name="megatron", engine_cls=MegatronEngine, parallel_dims=frozenset({"dp", "tp", "pp"}), needs_model_args=True,
    validate=validate, export_step=export_step, async_save=True, devices=frozenset({"cpu", "cuda"}),
    objectives=frozenset({"mntp", "simcse", "supervised", "d2llm", "teacher"}),
    # SDPA core attention: no s x s scores kept; on GPU, K / V repeated query-wide (attention.py)
    planner=PlannerTraits(pipeline_micro_batches=True, honours_recompute=True, scores_materialized=False,
                          kv_repeated=True, distributed_optimizer=True),
))
