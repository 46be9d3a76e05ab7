"""The full-scale dry run: a recipe's real per-rank state, built on the meta device, beside the plan.

Why: the planner (toolkit.planner) is arithmetic about the engine; the dry run asks the engine. For
a sample of ranks (first / middle / last pipeline stage, tp_rank 0, dp_rank 0) it builds that rank's
own modules through the engine's code path (backbone, LoRA, pooling head / IEM, optimizer:
`build_module(meta=True)`, `build_trainable`), under a fake process group of the full world size
(torch's "fake" backend, as torchtitan's dry runs do), so megatron-core believes it has every rank.
No weights are read (the architecture's config.json only) and no memory is used (meta tensors).
`materialize_step` allocates the gradients and optimizer states a step would; `state_bytes` counts
them. Activations are not measured: nothing runs forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from toolkit.config import ConfigError, RunConfig
from toolkit.distributed.parallel_dims import ParallelDims
from toolkit.engines.spec import engine_spec
from toolkit.planner import GIB, Plan

COLUMNS = ("weights", "grads", "optimizer")
DRY_RUN_HOOKS = ("build_module", "build_trainable", "materialize_step", "state_bytes", "merge_adapters")


@dataclass(kw_only=True)
class RankBytes:
    """One sampled rank in one training stage: measured bytes (the engine's tensors) and planned."""

    stage: str
    rank: int
    pp_rank: int
    role: str  # first | middle | last
    measured: dict[str, int]
    planned: dict[str, float]
    activations: float  # planned (not measured)
    reserve: float
    gpu_mem_gib: float
    extra: dict[str, str] = field(default_factory=dict)

    def ratio(self, column: str) -> float:
        """measured / planned; 1.0 when both are zero."""
        m, p = self.measured[column], self.planned[column]
        if p == 0:
            return 1.0 if m == 0 else float("inf")
        return m / p

    @property
    def state_ratio(self) -> float:
        """(weights + grads + optimizer) measured / planned."""
        return sum(self.measured.values()) / sum(self.planned.values())

    def within(self, tolerance: float) -> bool:
        """Every column and their sum within `tolerance` (relative) of the plan."""
        return all(abs(self.ratio(c) - 1) <= tolerance for c in COLUMNS) and abs(self.state_ratio - 1) <= tolerance

    @property
    def total(self) -> float:
        """Measured weights + grads + optimizer, plus the planned activations and reserve."""
        return sum(self.measured.values()) + self.activations + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_mem_gib * GIB


def sample_ranks(dims: ParallelDims) -> list[tuple[int, str]]:
    """(global rank, role) of the first, a middle and the last pipeline stage, at tp_rank 0, dp_rank 0."""
    stages = {0: "first", dims.pp // 2: "middle", dims.pp - 1: "last"}  # later keys win: last over middle
    return [(dims.rank_of(dp=0, tp=0, pp=p), role) for p, role in sorted(stages.items())]


def dry_run_rank(cfg: RunConfig, hf_config, *, gpus: int, rank: int, source: str = "config.json") -> list[dict[str, int]]:
    """state_bytes of `rank` in a `gpus`-rank world, per training stage of `cfg` (in order, stages chained
    as in training: a LoRA stage's adapters merged before the next stage builds its own)."""
    spec = engine_spec(cfg.engine)
    if not all(hasattr(spec.engine_cls, hook) for hook in DRY_RUN_HOOKS):
        raise ConfigError(f"engine={cfg.engine}: --dry-run builds the engine on the meta device, which this engine "
                          "does not support (engine=megatron does)")
    if dist.is_initialized():
        raise RuntimeError("dry run: a process group already exists in this process; run it in a fresh one")
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dims = ParallelDims.from_config(cfg.parallel, gpus, rank)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=gpus)
    try:
        engine = spec.build(cfg, dims)
        engine.build_module(hf_config, source=source, meta=True)
        out = []
        for index, stage in enumerate(cfg.stages):
            engine.build_trainable(index, stage)
            engine.materialize_step()
            out.append(engine.state_bytes())
            engine.optimizer.zero_grad(set_to_none=True)  # as after every real step
            engine.merge_adapters()  # as end_stage
        return out
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def dry_run(cfg: RunConfig, arch_file: str | Path, plans: list[Plan]) -> list[RankBytes]:
    """The sampled ranks of `plans` (one per training stage of `cfg`, from toolkit.planner.plan_run)."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(arch_file))
    plan0 = plans[0]
    dims = ParallelDims.from_config(cfg.parallel, plan0.gpus, 0)
    by_name = {p.stage: p for p in plans}
    rows = []
    for rank, role in sample_ranks(dims):
        per_stage = dry_run_rank(cfg, hf_config, gpus=plan0.gpus, rank=rank, source=str(arch_file))
        pp_rank = ParallelDims.from_config(cfg.parallel, plan0.gpus, rank).pp_rank
        for stage, measured in zip(cfg.stages, per_stage):
            if stage.name not in by_name:
                continue
            sm = by_name[stage.name].stages[pp_rank]
            rows.append(RankBytes(stage=stage.name, rank=rank, pp_rank=pp_rank, role=role, measured=measured,
                                  planned={"weights": sm.weights, "grads": sm.grads, "optimizer": sm.optimizer},
                                  activations=sm.activations, reserve=sm.reserve, gpu_mem_gib=plan0.gpu_mem_gib))
    return rows


def _gib(x: float) -> str:
    return f"{x / GIB:.3f}"


def format_dry_run(rows: list[RankBytes], gpus: int) -> str:
    """A table per training stage: measured / planned GiB and their ratio, per column and sampled rank."""
    lines = [f"dry run: real megatron modules of each sampled rank on the meta device, fake process group of "
             f"{gpus} ranks, no weights read; activations are NOT measured (planned values used for 'fits')"]
    header = ["rank (pp, role)"] + [f"{c} dry/plan GiB" for c in COLUMNS] + ["w+g+o ratio", "fits"]
    for stage in dict.fromkeys(r.stage for r in rows):
        table = [header]
        for r in (r for r in rows if r.stage == stage):
            cells = [f"{r.rank} ({r.pp_rank}, {r.role})"]
            cells += [f"{_gib(r.measured[c])}/{_gib(r.planned[c])} ({r.ratio(c):.3f})" for c in COLUMNS]
            verdict = f"yes ({r.total / GIB:.1f} GiB)" if r.fits else f"NO ({r.total / GIB:.1f} GiB)"
            table.append(cells + [f"{r.state_ratio:.4f}", verdict])
        widths = [max(len(row[i]) for row in table) + 2 for i in range(len(header))]
        lines += ["", f"stage {stage}:"] + ["".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)
