"""Megatron engine checkpoints: megatron `dist_checkpointing`, so a run resumes at another layout.

Model weights come from `GPTModel.sharded_state_dict()` (global layer numbers, TP sharding incl.
the fused QKV and SwiGLU layouts). Adam's moments have their parameter's shape, so each is saved as
a sharded tensor with its parameter's sharding (`make_sharded_optimizer_tensor`): resharding the
optimizer is resharding the model. The heads (pooling, a D2LLM stage's IEM: last stage, replicated),
Adam's per-parameter step counts and the LR schedule are saved alongside. Loading builds the same structure for the *current* layout and
lets dist_checkpointing read the right slices.

With the distributed optimizer each DP rank holds only a range of every bucket: the moments (and
bf16 runs' fp32 masters, key `optimizer.master`) are all-gathered over DP per bucket into the same
per-parameter tensors, so its checkpoints have the plain optimizer's layout and load at any DP
size, TP / PP layout, with or without the distributed optimizer; on load each rank keeps its range.
Cost: save and load hold this rank's TP / PP piece of the whole Adam state for a moment (as
megatron's own `fully_reshardable` format does; per-range writes would need `flattened_range`,
which megatron-core 0.16 refuses).
"""

from __future__ import annotations

from pathlib import Path

import torch

from toolkit.engines.megatron.dist_optimizer import DistributedOptimizer
from toolkit.errors import CheckpointError, MissingPathError

MODEL_DIR = "megatron"


def _sharded_state(engine, *, saving: bool) -> tuple[dict, dict]:
    """The sharded checkpoint structure, and each trainable parameter's sharded model tensor (by id)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    dims = engine.dims
    if engine.lora is not None:  # a LoRA stage saves its adapters; the frozen base is rebuilt on resume
        model_sd = engine.lora.sharded_state_dict(dims.dp_rank)
        part = "lora"
    else:
        model_sd = engine.model.sharded_state_dict(prefix="backbone.")
        part = "model"
    by_param = {}
    for value in model_sd.values():
        # SwiGLU's fc1 is a factory (gate and up halves re-split for any TP): the optimizer follows it.
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and isinstance(value.data, torch.nn.Parameter):
            by_param[id(value.data)] = value
    state: dict = {part: model_sd}
    if dims.is_last_stage:  # the heads: the pooling head, and a D2LLM stage's IEM (replicated, trained)
        replica = (0, dims.tp_rank, dims.dp_rank)
        heads = {"pooling": engine.encoder.pooling}
        if any(n.startswith("iem.") for n in engine.params):
            heads["iem"] = engine.encoder.iem
        for part_name, module in heads.items():
            for name, p in module.named_parameters():
                sharded = ShardedTensor.from_rank_offsets(f"{part_name}.{name}", p, replica_id=replica)
                state.setdefault(part_name, {})[name] = sharded
                by_param[id(p)] = sharded
    # Adam state of every trainable parameter; one that never had a gradient (the IEM branch of the
    # other task type) is saved as zeros with step 0, and gets no state back on load.
    moments: dict = {}
    distributed = isinstance(engine.optimizer, DistributedOptimizer)
    opt_state = {} if distributed else engine.optimizer.state
    gathered = engine.optimizer.gather_state() if distributed and saving else {}  # a collective over DP
    keys = ("exp_avg", "exp_avg_sq", "master") if distributed and engine.optimizer.keeps_masters else (
        "exp_avg", "exp_avg_sq")
    for name, p in engine.params.items():
        if id(p) not in by_param:
            raise RuntimeError(f"checkpoint: trainable parameter {name} has no sharded model tensor")
        zeros = {k: torch.zeros(p.shape, dtype=torch.float32 if distributed else p.dtype) for k in keys}
        st = gathered.get(name) or opt_state.get(p) or zeros
        for moment in keys:
            moments[f"{moment}.{name}"] = make_sharded_optimizer_tensor(by_param[id(p)], st[moment],
                                                                        f"optimizer.{moment}")
    state["optimizer"] = moments
    state["common"] = {"scheduler": engine.scheduler.state_dict(),
                       "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                        for g in engine.optimizer.param_groups]}
    return state, by_param


def _layout_free_id(sharded) -> str:
    """A parameter's name that no layout changes: its sharded key and global layer offsets."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(sharded, ShardedTensorFactory):  # SwiGLU's fc1: its built halves carry the offsets
        built = sharded.build()
        sharded = next(iter(built.values() if isinstance(built, dict) else built))
    return f"{sharded.key}@{tuple(sharded.global_offset[:sharded.prepend_axis_num])}"


def _adam_steps(engine, by_param: dict) -> dict[str, float]:
    """Adam's step count per parameter (it is per parameter: a branch without gradients does not
    step), from every rank, keyed layout-free; 0 = no state yet."""
    import torch.distributed as dist

    if isinstance(engine.optimizer, DistributedOptimizer):  # counted on every DP rank
        mine = {_layout_free_id(by_param[id(p)]): float(engine.optimizer.steps[n]) for n, p in engine.params.items()}
    else:
        opt_state = engine.optimizer.state
        mine = {_layout_free_id(by_param[id(p)]): float(opt_state[p]["step"]) if p in opt_state else 0.0
                for p in engine.params.values()}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {k: v for part in everyone for k, v in part.items()}


def save_strategy(engine):
    """torch_dist, wrapped so the DP replicas split the writing (each writes about 1/DP of the bytes;
    without it only DP replica 0 writes); plain torch_dist when `checkpoint.parallel_save` is off."""
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    base = TorchDistSaveShardedStrategy("torch_dist", 1)
    if engine.dims.dp == 1 or not engine.cfg.checkpoint.parallel_save:
        return base
    return FullyParallelSaveStrategyWrapper(base, engine.dims.dp_group)


def load_strategy(engine, source: Path):
    """With GPUs at DP > 1, the fully parallel load wrapper: each DP replica reads a part, then they
    exchange it (broadcasts over the DP group) instead of every replica reading all of its shards.
    Not on CPU: megatron-core 0.16.1's exchange (dist_checkpointing/exchange_utils.py) allocates its
    buffers with `init_data("cuda")` / `empty_like(device="cuda")` and calls `Tensor.cuda()`, which a
    CPU build refuses ("Torch not compiled with CUDA enabled") and no module-level shim can redirect;
    there every replica reads its own shards, as before (same bytes loaded, more read)."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    base = get_default_load_sharded_strategy(str(source))
    if engine.dims.dp == 1 or not engine.cfg.checkpoint.parallel_save or not torch.cuda.is_available():
        return base
    return FullyParallelLoadStrategyWrapper(base, engine.dims.dp_group)


def save(engine, step_dir: Path, *, async_save: bool = False):
    """Write this rank's part; with `async_save`, stage it and return megatron's AsyncRequest (the
    tensor files are written by whoever schedules it; `.metadata` and metadata.json by its finalize)."""
    from megatron.core import dist_checkpointing

    target = step_dir / MODEL_DIR
    if engine.dims.rank == 0:
        target.mkdir(parents=True, exist_ok=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    state, by_param = _sharded_state(engine, saving=True)
    state["common"]["adam_steps"] = _adam_steps(engine, by_param)  # a collective: at save only
    return dist_checkpointing.save(state, str(target), sharded_strategy=save_strategy(engine),
                                   async_sharded_save=async_save)


def load(engine, step_dir: Path) -> None:
    """Restore weights, heads, Adam moments and step counts and the LR schedule (any layout)."""
    from megatron.core import dist_checkpointing

    source = step_dir / MODEL_DIR
    if not source.is_dir():
        raise MissingPathError(f"{source}: missing; this checkpoint was not written by engine=megatron")
    # Materialise Adam state so the template has tensors to load into (steps come from the checkpoint).
    distributed = isinstance(engine.optimizer, DistributedOptimizer)
    for p in engine.params.values():
        if not distributed and p not in engine.optimizer.state:
            engine.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                         "exp_avg_sq": torch.zeros_like(p)}
    template, by_param = _sharded_state(engine, saving=False)
    try:
        loaded = dist_checkpointing.load(template, str(source), sharded_strategy=load_strategy(engine, source))
    except Exception as exc:  # name the checkpoint and the layouts, not just a key error deep inside
        raise CheckpointError(f"{source}: cannot load into tp={engine.dims.tp} pp={engine.dims.pp} "
                              f"dp={engine.dims.dp}: {exc}") from exc
    if ("lora" in loaded) != (engine.lora is not None):
        raise CheckpointError(f"{source}: saved {'with' if 'lora' in loaded else 'without'} LoRA adapters, but this "
                              f"stage has lora.enabled={engine.lora is not None}")
    if engine.lora is not None:
        with torch.no_grad():
            for key, value in loaded["lora"].items():
                engine.lora.adapters.get_parameter(key).copy_(value)
    else:
        engine.model.load_state_dict({k.removeprefix("backbone."): v for k, v in loaded["model"].items()},
                                     strict=False)
    for part_name in ("pooling", "iem"):
        if part_name in loaded:
            getattr(engine.encoder, part_name).load_state_dict(loaded[part_name])
    common = loaded["common"]
    per_param: dict[str, dict] = {}
    for key, value in loaded["optimizer"].items():
        moment, name = key.split(".", 1)
        per_param.setdefault(name, {})[moment] = value
    with torch.no_grad():
        for name, p in engine.params.items():
            # "adam_step": one count for all, in checkpoints written before per-parameter counts
            step = common["adam_steps"].get(_layout_free_id(by_param[id(p)])) if "adam_steps" in common \
                else float(common["adam_step"])
            if step is None:
                raise CheckpointError(f"{source}: no Adam step count for {name} (a checkpoint of another model?)")
            if distributed:  # after the weights (fp32 runs: they are the masters)
                engine.optimizer.load_state(name, per_param[name], int(step))
                continue
            if step == 0:  # never updated before the save: no Adam state, as then
                del engine.optimizer.state[p]
                continue
            st = engine.optimizer.state[p]
            st["exp_avg"].copy_(loaded["optimizer"][f"exp_avg.{name}"])
            st["exp_avg_sq"].copy_(loaded["optimizer"][f"exp_avg_sq.{name}"])
            st["step"] = torch.tensor(step)
    for group, saved in zip(engine.optimizer.param_groups, common["param_groups"]):
        group.update(saved)
    engine.scheduler.load_state_dict(common["scheduler"])
