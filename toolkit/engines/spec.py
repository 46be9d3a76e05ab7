"""Engine specs: what each backend is, can do and refuses, in one registry (torchtitan's TrainSpec,
verl's engine registry).

A spec is data plus a few functions: the engine class, its capabilities (parallel dimensions,
precisions, objectives), `validate(cfg, model_args)` holding every engine-specific refusal,
`export_step` turning one of its `step-N/` checkpoints into an encoder folder, and the facts the
memory planner needs. `validate_run` is the pre-flight every entry point runs (train, submit slurm,
submit ray, plan) before any weight is read, and the engine runs again once the model's config is
known, so a recipe is refused with the same message wherever it is refused.
Nothing outside toolkit/engines/ names an engine: it asks this registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from toolkit.config import ConfigError, RunConfig

if TYPE_CHECKING:  # type hints only
    from toolkit.distributed.parallel_dims import ParallelDims
    from toolkit.engines.base import Engine
    from toolkit.models.arch import ModelArgs

DEFAULT_ENGINE = "hf"  # what checkpoints written before engines were recorded in meta.json used

# partition(cfg, dp, weights, grads, optimizer, notes) -> (weights, grads, optimizer) bytes per GPU
Partition = Callable[[RunConfig, int, float, float, float, list], tuple[float, float, float]]


@dataclass(frozen=True, kw_only=True)
class PlannerTraits:
    """How an engine lays out memory, as the planner (toolkit.planner) counts it."""

    pipeline_micro_batches: bool = False  # parallel.micro_batch_size splits a step's batch (pipeline schedule)
    honours_recompute: bool = False  # parallel.recompute selects activation recomputation
    scores_materialized: bool = False  # attention keeps the [b*heads, s, s] scores (unfused core attention)
    kv_repeated: bool = False  # attention keeps K / V repeated to every query head (GQA), on GPU
    distributed_optimizer: bool = False  # optimizer states sharded over DP (megatron's DistributedOptimizer)
    bf16_keeps_bf16_weights: bool = False  # precision bf16 = bf16 weights (trainable too) + fp32 masters
    partition: Partition | None = None  # ZeRO-style sharding of weights / grads / optimizer over DP
    gathers_layer_weights: Callable[[RunConfig], bool] | None = None  # a layer's weights gathered while it runs


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    name: str
    engine_cls: type["Engine"]
    parallel_dims: frozenset[str]  # of dp, tp, pp
    precisions: frozenset[str] = frozenset({"fp32", "bf16"})
    objectives: frozenset[str] = frozenset({"mntp", "simcse", "supervised", "d2llm"})
    needs_model_args: bool = False  # validate() checks shapes (it is given ModelArgs when the config is readable)
    validate: Callable[[RunConfig, "ModelArgs | None"], None] = lambda cfg, args: None
    export_step: Callable[[RunConfig, int, Path, Path], Path]  # (run config, stage index, step dir, output)
    planner: PlannerTraits = PlannerTraits()
    # engine settings that change a run's trajectory, fingerprinted with the recipe (resume refuses changes)
    trajectory_settings: Callable[[RunConfig], dict] = lambda cfg: {}
    async_save: bool = False  # its Engine.begin_save can return a save still in flight (checkpoint.async_save)
    devices: frozenset[str] = frozenset({"cpu"})  # where it trains; `device: auto` picks CUDA only if listed

    def build(self, cfg: RunConfig, dims: "ParallelDims") -> "Engine":
        return self.engine_cls(cfg, dims)


_REGISTRY: dict[str, EngineSpec] = {}


def register_engine(spec: EngineSpec) -> EngineSpec:
    if spec.name in _REGISTRY:
        raise RuntimeError(f"engine {spec.name!r} is registered twice ({_REGISTRY[spec.name].engine_cls.__module__} "
                           f"and {spec.engine_cls.__module__})")
    spec.engine_cls.name = spec.name
    _REGISTRY[spec.name] = spec
    return spec


def engine_names() -> list[str]:
    return sorted(_REGISTRY)


def engine_spec(name: str) -> EngineSpec:
    if name not in _REGISTRY:
        raise ConfigError(f"engine: {name!r} is not an engine; registered engines: {', '.join(engine_names())}")
    return _REGISTRY[name]


def validate_run(cfg: RunConfig, model_args: "ModelArgs | None" = None) -> EngineSpec:
    """Every refusal of `cfg` by its engine, before any weight is read; returns the engine's spec.

    Shape checks need `model_args`; without them (a model not yet on disk) they run when the engine
    reads the model's config, before its weights."""
    spec = engine_spec(cfg.engine)
    par = cfg.parallel
    for dim in ("tp", "pp"):
        if getattr(par, dim) > 1 and dim not in spec.parallel_dims:
            able = [n for n, s in sorted(_REGISTRY.items()) if dim in s.parallel_dims]
            raise ConfigError(f"parallel.tp/pp: engine={spec.name} is data-parallel only (tp={par.tp}, pp={par.pp}); "
                              f"use engine: {' or '.join(able)}")
    if par.distributed_optimizer and not spec.planner.distributed_optimizer:
        able = [n for n, s in sorted(_REGISTRY.items()) if s.planner.distributed_optimizer]
        raise ConfigError(f"parallel.distributed_optimizer: engine={spec.name} has no distributed optimizer; "
                          f"use engine: {' or '.join(able)}" + (" (or zero.stage >= 1)" if spec.name == "deepspeed" else ""))
    for index, stage in enumerate(cfg.stages):
        where = f"stages[{index}] ({stage.name})"
        if stage.precision not in spec.precisions:
            raise ConfigError(f"{where}.precision={stage.precision}: engine={spec.name} supports "
                              f"{', '.join(sorted(spec.precisions))}")
        if stage.objective.kind not in spec.objectives:
            raise ConfigError(f"{where}.objective.kind={stage.objective.kind}: engine={spec.name} trains "
                              f"{', '.join(sorted(spec.objectives))}")
    if cfg.checkpoint.async_save and not spec.async_save:
        able = [n for n, s in sorted(_REGISTRY.items()) if s.async_save]
        raise ConfigError(f"checkpoint.async_save: engine={spec.name} saves synchronously only; set "
                          f"checkpoint.async_save: false (or use engine: {' or '.join(able)})")
    if cfg.device != "auto" and cfg.device not in spec.devices:
        able = [n for n, s in sorted(_REGISTRY.items()) if cfg.device in s.devices]
        raise ConfigError(f"device={cfg.device}: engine={spec.name} trains on {', '.join(sorted(spec.devices))} "
                          f"only in this version; set device: auto (or use engine: {' or '.join(able)})")
    spec.validate(cfg, model_args)
    return spec


def build_engine(cfg: RunConfig, dims: "ParallelDims", model_args: "ModelArgs | None" = None) -> "Engine":
    """The recipe's engine for this rank, after its pre-flight checks."""
    return validate_run(cfg, model_args).build(cfg, dims)
