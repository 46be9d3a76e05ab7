"""Megatron engine checkpoints: megatron `dist_checkpointing`, so a run resumes at another layout.

Model weights come from `GPTModel.sharded_state_dict()` (global layer numbers, TP sharding incl.
the fused QKV and SwiGLU layouts). Adam's moments have their parameter's shape, so each is saved as
a sharded tensor with its parameter's sharding (`make_sharded_optimizer_tensor`): resharding the
optimizer is resharding the model. The pooling head (last stage, replicated) and the step counters
and LR schedule are saved alongside. Loading builds the same structure for the *current* layout and
lets dist_checkpointing read the right slices.
"""

from __future__ import annotations

from pathlib import Path

import torch

MODEL_DIR = "megatron"


def _sharded_state(engine) -> dict:
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
    if dims.is_last_stage:
        replica = (0, dims.tp_rank, dims.dp_rank)
        for name, p in engine.encoder.pooling.named_parameters():
            key = f"pooling.{name}"
            sharded = ShardedTensor.from_rank_offsets(key, p, replica_id=replica)
            state.setdefault("pooling", {})[name] = sharded
            by_param[id(p)] = sharded
    moments: dict = {}
    opt_state = engine.optimizer.state
    for name, p in engine.params.items():
        if p not in opt_state:
            continue
        if id(p) not in by_param:
            raise RuntimeError(f"checkpoint: trainable parameter {name} has no sharded model tensor")
        for moment in ("exp_avg", "exp_avg_sq"):
            moments[f"{moment}.{name}"] = make_sharded_optimizer_tensor(by_param[id(p)], opt_state[p][moment],
                                                                        f"optimizer.{moment}")
    state["optimizer"] = moments
    steps = {float(opt_state[p]["step"]) for p in engine.params.values() if p in opt_state}
    state["common"] = {"adam_step": steps.pop() if steps else 0.0, "scheduler": engine.scheduler.state_dict(),
                       "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                        for g in engine.optimizer.param_groups]}
    return state


def save(engine, step_dir: Path) -> None:
    from megatron.core import dist_checkpointing

    target = step_dir / MODEL_DIR
    if engine.dims.rank == 0:
        target.mkdir(parents=True, exist_ok=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    dist_checkpointing.save(_sharded_state(engine), str(target))


def load(engine, step_dir: Path) -> None:
    """Restore weights, pooling head, Adam moments, step counter and LR schedule (any layout)."""
    from megatron.core import dist_checkpointing

    source = step_dir / MODEL_DIR
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: missing; this checkpoint was not written by engine=megatron")
    # Materialise Adam state so the template has tensors to load into.
    for p in engine.params.values():
        if p not in engine.optimizer.state:
            engine.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                         "exp_avg_sq": torch.zeros_like(p)}
    template = _sharded_state(engine)
    try:
        loaded = dist_checkpointing.load(template, str(source))
    except Exception as exc:  # name the checkpoint and the layouts, not just a key error deep inside
        raise RuntimeError(f"{source}: cannot load into tp={engine.dims.tp} pp={engine.dims.pp} "
                           f"dp={engine.dims.dp}: {exc}") from exc
    if ("lora" in loaded) != (engine.lora is not None):
        raise RuntimeError(f"{source}: saved {'with' if 'lora' in loaded else 'without'} LoRA adapters, but this "
                           f"stage has lora.enabled={engine.lora is not None}")
    if engine.lora is not None:
        with torch.no_grad():
            for key, value in loaded["lora"].items():
                engine.lora.adapters.get_parameter(key).copy_(value)
    else:
        engine.model.load_state_dict({k.removeprefix("backbone."): v for k, v in loaded["model"].items()},
                                     strict=False)
    if "pooling" in loaded:
        engine.encoder.pooling.load_state_dict(loaded["pooling"])
    common = loaded["common"]
    with torch.no_grad():
        for name, p in engine.params.items():
            st = engine.optimizer.state[p]
            st["exp_avg"].copy_(loaded["optimizer"][f"exp_avg.{name}"])
            st["exp_avg_sq"].copy_(loaded["optimizer"][f"exp_avg_sq.{name}"])
            st["step"] = torch.tensor(float(common["adam_step"]))
    for group, saved in zip(engine.optimizer.param_groups, common["param_groups"]):
        group.update(saved)
    engine.scheduler.load_state_dict(common["scheduler"])
