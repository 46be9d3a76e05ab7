"""Uneven pipeline stages (parallel.first_stage_layers / last_stage_layers): one split everywhere.

`ModelArgs.stage_layers` is the split the conversion, the model build, LoRA names and the planner
use; it must be megatron-core's own (layer offsets and counts), the engine must train to the
single-process reference with it (the parity tests' 1e-5 in fp32), the planner must count the
engine's parameters per stage, and bad values must be refused with the field named.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import ROOT, free_port, save_tiny_decoder
from toolkit.config import ConfigError, ParallelConfig, config_from_dict
from toolkit.engines.spec import validate_run
from toolkit.models.arch import ModelArgs, read_model_args
from toolkit.models.tiny import tiny_config
from toolkit.planner import plan_stage

ARCH_405B = ModelArgs.from_dict(json.loads((ROOT / "configs/scale/arch/llama3.1-405b.json").read_text()))


def tiny_arch(layers: int) -> ModelArgs:
    return ModelArgs.from_hf_config(tiny_config("llama", num_hidden_layers=layers))


def recipe(engine: str = "megatron", **parallel):
    return config_from_dict({"output_dir": "x", "engine": engine, "model": {"path": "x"}, "parallel": parallel,
                             "stages": [{"name": "a", "steps": 1, "data": {"path": "x"}, "objective": {"kind": "mntp"}}]})


def test_stage_layer_split():
    assert ARCH_405B.stage_layer_counts(8, 14, 16) == [14] + [16] * 6 + [16]
    assert ARCH_405B.stage_layers(8, 0, 14, 16) == range(0, 14)
    assert ARCH_405B.stage_layers(8, 1, 14, 16) == range(14, 30)
    assert ARCH_405B.stage_layers(8, 7, 14, 16) == range(110, 126)
    assert tiny_arch(4).stage_layer_counts(3, 1, 1) == [1, 2, 1]
    assert tiny_arch(4).stage_layer_counts(2, 3, 0) == [3, 1]  # only the first fixed: the rest is the "middle"
    assert tiny_arch(4).stage_layer_counts(2, 0, 3) == [1, 3]
    assert tiny_arch(6).stage_layer_counts(3) == [2, 2, 2]
    assert [len(ARCH_405B.stage_layers(8, p, 14, 16)) for p in range(8)] == ARCH_405B.stage_layer_counts(8, 14, 16)


@pytest.mark.parametrize("layers,pp,first,last", [(4, 2, 1, 0), (4, 2, 0, 3), (4, 3, 1, 1), (5, 3, 1, 0), (7, 4, 1, 0),
                                                 (7, 4, 0, 1), (126, 8, 14, 16), (126, 8, 15, 15), (4, 2, 0, 0)])
def test_split_is_megatron_cores(layers, pp, first, last):
    """Offsets and layer counts per stage equal megatron-core's for the config the engine builds."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from toolkit.engines.megatron.model import stage_layers, transformer_config

    arch = tiny_arch(layers)
    config = transformer_config(arch, tp=1, pp=pp, first_stage_layers=first, last_stage_layers=last)
    for p in range(pp):
        offset, count = get_transformer_layer_offset(config, pp_rank=p), get_num_layers_to_build(config, pp_rank=p)
        assert stage_layers(arch, config, p) == arch.stage_layers(pp, p, first, last) == range(offset, offset + count)


@pytest.mark.parametrize("layers,pp,first,last,message", [
    (4, 3, 1, 0, "parallel.first_stage_layers=1: the other 3 of num_hidden_layers=4 do not split evenly over the "
                 "other 2 of pp=3 stages"),
    (4, 2, 1, 1, "parallel.first_stage_layers=1 parallel.last_stage_layers=1: the other 2 of num_hidden_layers=4 "
                 "do not split evenly over the other 0 of pp=2 stages"),
    (4, 3, 2, 2, "parallel.first_stage_layers=2 parallel.last_stage_layers=2: the other 0 of"),
    (4, 2, 5, 0, "parallel.first_stage_layers=5: the other -1 of"),
    (5, 2, 0, 0, "parallel.pp=2: num_hidden_layers=5 is not divisible by pp (parallel.first_stage_layers"),
])
def test_bad_splits_are_refused_naming_the_field(layers, pp, first, last, message):
    from toolkit.engines.megatron.validate import validate

    cfg = recipe(pp=pp, first_stage_layers=first, last_stage_layers=last)
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.")) as info:
        validate(cfg, tiny_arch(layers))
    assert "\n" not in str(info.value)


def test_config_and_other_engines_refuse_uneven_stages():
    with pytest.raises(ConfigError, match=r"^parallel\.first_stage_layers=2: must be >= 0 and needs parallel\.pp > 1"):
        ParallelConfig(first_stage_layers=2)
    with pytest.raises(ConfigError, match=r"^parallel\.last_stage_layers=-1: must be >= 0"):
        ParallelConfig(pp=2, last_stage_layers=-1)
    for engine in ("hf", "deepspeed"):  # data-parallel only: pp = 1, so the fields cannot be set there
        with pytest.raises(ConfigError, match=f"^parallel.tp/pp: engine={engine} is data-parallel only"):
            validate_run(recipe(engine, pp=2, first_stage_layers=1), tiny_arch(4))
        with pytest.raises(ConfigError, match=r"parallel\.first_stage_layers=1: .*needs parallel\.pp > 1"):
            recipe(engine, first_stage_layers=1)


def test_planner_counts_uneven_stages():
    cfg = recipe(pp=8, first_stage_layers=14, last_stage_layers=16, tp=8)
    plan = plan_stage(cfg, cfg.stages[0], ARCH_405B, gpus=64, gpu_mem_gib=80)
    assert [s.layers for s in plan.stages] == [14] + [16] * 7
    lora = cfg.stages[0].lora
    lp = ARCH_405B.layer_params(8) + ARCH_405B.lora_params(lora.target_modules, lora.r, 8)  # + its adapters
    assert plan.stages[1].params - plan.stages[2].params == 0
    assert plan.stages[1].params - plan.stages[0].params == 2 * lp - ARCH_405B.embedding_params(8)


# ---------------------------------------------------------------------------------------------- engine (gloo)
def _count_worker(rank: int, world: int, port: int, model_dir: str, pp: int, extra: dict, out: str):
    """Parameters and layers this stage's engine holds (backbone, then + LoRA adapters)."""
    from tests.test_megatron_parity import _start_engine, lora_config

    cfg = lora_config(Path(model_dir), pp=pp, extra=extra)
    try:
        engine, dims = _start_engine(rank, world, port, cfg)
        backbone = sum(p.numel() for p in engine.model.parameters())
        engine.begin_stage(0, cfg.stages[0], data_kind="text", generator=torch.Generator().manual_seed(0))
        adapters = sum(p.numel() for p in engine.lora.parameters())
        layers = [layer.layer_number - 1 for layer in engine.model.decoder.layers]
        names = sorted({engine.lora.global_layer(k) for k in engine.lora.adapters})
        mine = (dims.pp_rank, backbone, adapters, layers, names)
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            torch.save(everyone, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_planner_parameters_equal_the_engines_at_an_uneven_layout(tmp_path):
    from tests.test_megatron_parity import lora_config

    model_dir = save_tiny_decoder(tmp_path / "m", "llama", num_hidden_layers=5)
    extra, out = {"first_stage_layers": 1, "last_stage_layers": 2}, tmp_path / "counts.pt"
    mp.spawn(_count_worker, args=(3, free_port(), str(model_dir), 3, extra, str(out)), nprocs=3, join=True)
    got = sorted(torch.load(out))
    cfg = lora_config(model_dir, pp=3, extra=extra)
    arch = read_model_args(model_dir / "config.json")
    plan = plan_stage(cfg, cfg.stages[0], arch, gpus=3, gpu_mem_gib=80)
    for (p, backbone, adapters, layers, names), stage in zip(got, plan.stages):
        assert layers == names == list(arch.stage_layers(3, p, 1, 2)) and stage.layers == len(layers)
        assert stage.params == backbone + adapters, p
        assert stage.trainable == adapters, p
    assert [len(g[3]) for g in got] == [1, 2, 2]


@pytest.mark.slow
def test_uneven_pp3_matches_the_single_process_reference(tmp_path):
    """PP3 with 1 + 2 + 1 layers: MNTP, supervised and GradCache losses, norms and every gradient
    (mapped back to HF names through the uneven split) within the parity tests' 1e-5."""
    from tests.test_megatron_parity import TOL, _worker, reference

    model_dir = save_tiny_decoder(tmp_path / "llama", "llama", num_hidden_layers=4)
    out = tmp_path / "megatron.pt"
    extra = {"first_stage_layers": 1, "last_stage_layers": 1}
    mp.spawn(_worker, args=(3, free_port(), str(model_dir), 1, 3, str(out), extra), nprocs=3, join=True)
    got, want = torch.load(out), reference(model_dir, 1)
    for stage in ("mntp", "supervised", "gradcache"):
        g, w = got[stage], want[stage]
        assert abs(g["loss"] - w["loss"]) <= TOL, (stage, g["loss"], w["loss"])
        assert abs(g["norm"] - w["norm"]) <= TOL * max(1.0, w["norm"]), stage
        assert sorted(g["grads"]) == sorted(w["grads"]), stage
        assert max((g["grads"][k] - w["grads"][k]).abs().max().item() for k in w["grads"]) <= TOL, stage
        assert w["norm"] > 1e-3


@pytest.mark.slow
def test_uneven_pp2_lora_matches_peft(tmp_path):
    """PP2 with 3 + 1 layers, LoRA on every projection (adapters named by megatron's global layer):
    loss, every adapter gradient and the merged weights equal peft's within 1e-5."""
    from tests.test_megatron_parity import TOL, _lora_worker, lora_reference

    model_dir = save_tiny_decoder(tmp_path / "qwen2", "qwen2", num_hidden_layers=4)
    out = tmp_path / "megatron.pt"
    mp.spawn(_lora_worker, args=(2, free_port(), str(model_dir), 1, 2, str(out), {"first_stage_layers": 3}),
             nprocs=2, join=True)
    got, want = torch.load(out), lora_reference(model_dir, 1)
    for stage in ("mntp", "supervised"):
        g, w = got[stage], want[stage]
        assert abs(g["loss"] - w["loss"]) <= TOL, stage
        assert sorted(g["grads"]) == sorted(w["grads"]) and len(w["grads"]) == 4 * 7 * 2
        # adapter gradients reach a few hundred: 1e-5 relative to each tensor's scale, as the parity test
        worst = max((g["grads"][k] - w["grads"][k]).abs().max().item() / max(1.0, w["grads"][k].abs().max().item())
                    for k in w["grads"])
        assert worst <= TOL, (stage, worst)
        assert max((g["merged"][k] - w["merged"][k]).abs().max().item() for k in w["merged"]) <= TOL, stage


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 3 megatron runs under torchrun + an export
def test_uneven_run_resumes_at_an_even_split_and_exports(tmp_path):
    """Checkpoints are keyed by megatron's global layer numbers: a PP2 run with 3 + 1 layers stopped
    mid-MNTP resumes at the even 2 + 2 split (full weights + Adam moments, then LoRA) to the losses of
    an uninterrupted 3 + 1 run, and its step checkpoint exports into one process."""
    import subprocess

    from tests.helpers import EMBEDFORGE, losses, torchrun, two_stage_recipe

    cfg = two_stage_recipe(tmp_path)  # a 4-layer tiny llama
    full, sliced = tmp_path / "full", tmp_path / "sliced"
    uneven = ("parallel.pp=2", "parallel.first_stage_layers=3")
    a = torchrun("train", str(cfg), f"output_dir={full}", *uneven)
    assert a.returncode == 0, a.stderr[-4000:]
    b = torchrun("train", str(cfg), f"output_dir={sliced}", *uneven, "--stop-after-steps", "2")
    assert b.returncode != 0 and "stopped at step 2" in b.stderr, b.stderr[-4000:]
    x = subprocess.run([EMBEDFORGE, "export", "--checkpoint", str(sliced / "00-mntp" / "step-2"), "--output",
                        str(tmp_path / "exported")], capture_output=True, text=True, timeout=600)
    assert x.returncode == 0, x.stderr[-4000:]
    c = torchrun("train", str(cfg), f"output_dir={sliced}", "parallel.pp=2")
    assert c.returncode == 0, c.stderr[-4000:]
    want, got = losses(full), losses(sliced)
    assert len(want) == 7 and set(got) == set(want)
    for key, value in want.items():
        assert abs(got[key] - value) <= 1e-4 * max(1.0, abs(value)), (key, got[key], value)
