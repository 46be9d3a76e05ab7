"""The megatron engine's distributed optimizer (ZeRO-1) == torch AdamW over replicated state.

In gloo processes on a tiny Llama (4 layers), several full fine-tuning steps per layout:
- fp32: losses and weights with `parallel.distributed_optimizer=true` equal the plain path within
  1e-5 at DP2 (MNTP: full fine-tuning and LoRA) and TP2 x DP2 (supervised contrastive); small buckets, so several reductions
  start inside the backward (overlap) and clipping is active (clip_grad below the norm);
- optimizer state per rank (measured tensors) is the total / dp up to bucket padding, at DP 2 and 4;
- bf16 weights + fp32 masters train (loss falls, finite) and the masters track the fp32 run;
- a checkpoint saved at TP2 x DP2 resumes at DP4 and at PP2 x DP2 with the uninterrupted run's
  losses and weights.
In one process (fast): the buckets, hooks and update against torch AdamW, and the recipes refused.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import CORPUS, free_port, save_tiny_decoder
from toolkit.config import config_from_dict

SEED, BATCH, STEPS, TOL = 7, 8, 4, 1e-5
BUCKET = 20_000  # elements: the tiny model splits into several buckets


def make_config(model_dir: str, kind: str, *, tp: int = 1, pp: int = 1, dist_opt: bool = False,
                dtype: str = "float32", micro: int = 0, lora: bool = False, sp: bool = False):
    objective = {"kind": "mntp", "mntp": {"mask_probability": 0.3, "mask_token": "eos"}} if kind == "mntp" else {
        "kind": "supervised", "temperature": 0.05}
    return config_from_dict({
        "output_dir": "unused", "seed": SEED, "engine": "megatron",
        "parallel": {"tp": tp, "pp": pp, "distributed_optimizer": dist_opt, "micro_batch_size": micro,
                     "sequence_parallel": sp},
        "model": {"path": model_dir, "max_length": 32, "dtype": dtype},
        "pooling": {"mode": "mean"},
        "stages": [{"name": kind, "steps": STEPS, "lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0}, "data": {"path": "unused", "max_length": 32},
                    "objective": objective, "precision": "bf16" if dtype == "bfloat16" else "fp32",
                    "optimizer": {"lr": 1e-3, "weight_decay": 0.01, "clip_grad": 0.5}}],
    })


def batch(kind: str, step: int) -> list[dict]:
    texts = list(dict.fromkeys(CORPUS))
    n = len(texts)
    if kind == "mntp":
        return [{"text": texts[(i + step) % n] + " more" * (i % 3)} for i in range(BATCH)]
    return [{"query": texts[(i + step) % n], "positive": texts[(i + step + 1) % n] + " indeed",
             "negatives": [texts[(i + step + 3) % n]], "instruction": "Find", "task": "t"} for i in range(BATCH)]


def _run(rank: int, world: int, run: dict) -> dict:
    """One layout: build, (load), train steps [first, STEPS], (save after `save_at`); rank 0 gets the results."""
    from toolkit.distributed.parallel_dims import ParallelDims
    from toolkit.engines.megatron import dist_optimizer
    from toolkit.engines.megatron.engine import MegatronEngine

    dist_optimizer.BUCKET_ELEMENTS = BUCKET
    cfg = make_config(run["model"], run["kind"], tp=run.get("tp", 1), pp=run.get("pp", 1),
                      dist_opt=run.get("dist", False), dtype=run.get("dtype", "float32"), micro=run.get("micro", 0),
                      lora=run.get("lora", False), sp=run.get("sp", False))
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    engine = MegatronEngine(cfg, dims)
    engine.build(add_mask_token=False)
    kind = "text" if run["kind"] == "mntp" else "pair"
    engine.begin_stage(0, cfg.stages[0], data_kind=kind, generator=torch.Generator().manual_seed(SEED))
    first = 1
    if run.get("initial"):
        result_initial = {n: p.detach().clone() for n, p in engine.params.items()}
    if "load" in run:
        engine.load(Path(run["load"]))
        first = run["load_step"] + 1
    per = BATCH // dims.dp
    result = {"losses": {}, "norms": {}}
    if run.get("initial"):
        result["initial"] = result_initial
    for step in range(first, STEPS + 1):
        shard = batch(run["kind"], step)[dims.dp_rank * per : (dims.dp_rank + 1) * per]
        out = engine.train_step([shard])
        assert not out.skipped
        result["losses"][step], result["norms"][step] = out.loss, out.grad_norm
        if step == run.get("save_at"):
            engine.save(Path(run["save"]))
    result["weights"] = engine.hf_state_dict()
    result["params"] = {n: p.detach().clone() for n, p in engine.params.items()}  # this rank's pieces
    opt = engine.optimizer
    if run.get("dist"):
        full = opt.gather_state()
        result["masters"] = {n: s["master"] for n, s in full.items() if "master" in s}
        if opt.keeps_masters:  # largest |master - weight| relative to the tensor's largest weight
            result["master_gap"] = max(((full[n]["master"] - p.float()).abs().max() / p.float().abs().max()).item()
                                       for n, p in engine.params.items() if p.dtype == torch.bfloat16)
        result["state_bytes"] = [None] * world
        dist.all_gather_object(result["state_bytes"], opt.state_bytes())
        result["overlapped"] = opt.launched_in_backward
        result["buckets"] = len(opt.buckets)
        result["trainable"] = sum(p.numel() for p in engine.params.values())
    return result


def _worker(rank: int, world: int, port: int, runs: list[dict], out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = [_run(rank, world, run) for run in runs]
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def spawn(tmp_path: Path, world: int, runs: list[dict]) -> list[dict]:
    out = tmp_path / "results.pt"
    mp.spawn(_worker, args=(world, free_port(), runs, str(out)), nprocs=world, join=True)
    return torch.load(out)


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_same_run(got: dict, want: dict, steps) -> None:
    for step in steps:
        assert abs(got["losses"][step] - want["losses"][step]) <= TOL, (step, got["losses"], want["losses"])
        assert abs(got["norms"][step] - want["norms"][step]) <= TOL * max(1.0, want["norms"][step])
    assert max_diff(got["weights"], want["weights"]) <= TOL


def assert_state_is_sharded(run: dict, dp: int) -> None:
    """Adam m + v (fp32) of every trainable element exactly once over DP, each rank ~1/dp of it."""
    total = 8 * run["trainable"]
    per_rank = run["state_bytes"]
    assert sum(per_rank) == total * len(per_rank) // dp  # each DP group holds the state once
    pad = 8 * dp * run["buckets"]  # bucket padding: at most dp - 1 elements per bucket
    assert max(per_rank) <= total / dp + pad and min(per_rank) >= total / dp - pad, (per_rank, total)


@pytest.mark.slow
def test_dp2_fp32_equals_plain_adamw_and_bf16_masters_train(tmp_path):
    model = str(save_tiny_decoder(tmp_path / "tiny", "llama", num_hidden_layers=4))
    base = {"model": model, "kind": "mntp", "micro": 2}  # 2 micro-batches: reductions wait for the last
    plain, sharded, bf16, lora_plain, lora_sharded = spawn(tmp_path, 2, [
        {**base, "initial": True}, {**base, "dist": True}, {**base, "dist": True, "dtype": "bfloat16"},
        {**base, "lora": True}, {**base, "lora": True, "dist": True}])
    assert_same_run(sharded, plain, range(1, STEPS + 1))
    assert_same_run(lora_sharded, lora_plain, range(1, STEPS + 1))  # adapters in the buckets
    assert max_diff(lora_sharded["params"], lora_plain["params"]) <= TOL  # the adapters themselves
    assert max_diff(sharded["weights"], plain["weights"]) <= TOL
    assert sharded["buckets"] > 2 and sharded["overlapped"] > 0  # reductions started inside the backward
    assert plain["norms"][1] > 0.5  # clipping was active
    assert_state_is_sharded(sharded, 2)

    # the planner's optimizer bytes are the bytes the engine holds (fp32: m + v; bf16: + masters)
    for run, dtype in ((sharded, "float32"), (bf16, "bfloat16")):
        planned = planned_stage(model, dtype, dp=2)
        assert planned.trainable == run["trainable"]
        assert abs(planned.optimizer - max(run["state_bytes"])) <= 12 * 2 * run["buckets"], (planned, run["state_bytes"])

    # bf16 weights, fp32 masters: finite, falling loss; the masters round to the bf16 weights, and
    # the masters stay much nearer the fp32 run's weights than the distance that run travelled (on
    # average: Adam's steps are ~lr wherever the gradient's sign is clear; bf16 noise flips a few).
    losses = [bf16["losses"][s] for s in range(1, STEPS + 1)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert bf16["state_bytes"][0] > sharded["state_bytes"][0]  # + the fp32 masters of its range
    assert 0 < bf16["master_gap"] <= 2 ** -8  # relative: bf16 rounding of an fp32 master, no more
    names = sorted(plain["params"])
    assert sorted(bf16["masters"]) == names
    moved = torch.cat([(plain["params"][n] - plain["initial"][n]).abs().flatten() for n in names]).mean()
    gap = torch.cat([(bf16["masters"][n] - plain["params"][n]).abs().flatten() for n in names]).mean()
    assert moved > 1e-4 and gap <= 0.25 * moved, (gap, moved)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 4 processes, 4 runs
def test_tp2_dp2_equals_plain_and_resumes_at_dp4(tmp_path):
    """Supervised contrastive (negatives gathered across DP: the loss does not depend on the DP
    split), so a run saved at TP2 x DP2 and resumed at DP4 or PP2 x DP2 must continue the same trajectory."""
    model = str(save_tiny_decoder(tmp_path / "tiny", "llama", num_hidden_layers=4))
    base = {"model": model, "kind": "supervised"}
    ckpt = tmp_path / "step-2"
    plain, sharded, resumed, piped = spawn(tmp_path, 4, [
        {**base, "tp": 2},
        {**base, "tp": 2, "sp": True, "dist": True, "save_at": 2, "save": str(ckpt)},  # + sequence parallel
        {**base, "dist": True, "load": str(ckpt), "load_step": 2},  # tp = 1: dp = 4
        {**base, "pp": 2, "dist": True, "load": str(ckpt), "load_step": 2},  # 1F1B: no_sync until the last
    ])
    assert_same_run(sharded, plain, range(1, STEPS + 1))
    assert sharded["overlapped"] > 0
    assert_state_is_sharded(sharded, 2)
    assert_state_is_sharded(resumed, 4)
    assert_same_run(resumed, sharded, range(3, STEPS + 1))  # Adam moments and steps resharded TP2xDP2 -> DP4
    assert_same_run(piped, sharded, range(3, STEPS + 1))  # ... and -> PP2 x DP2
    assert resumed["losses"][STEPS] < plain["losses"][1]


def planned_stage(model: str, dtype: str, *, dp: int):
    from transformers import AutoConfig

    from toolkit.models.arch import ModelArgs
    from toolkit.planner import plan_stage

    cfg = make_config(model, "mntp", dist_opt=True, dtype=dtype)
    arch = ModelArgs.from_hf_config(AutoConfig.from_pretrained(model), source=model)
    return plan_stage(cfg, cfg.stages[0], arch, gpus=dp, gpu_mem_gib=80).stages[0]


def test_one_process_buckets_hooks_and_update_equal_torch_adamw():
    """dp = 1, no process group: gradients of two micro-batches (the first under no_sync) land in
    the fp32 buckets; a parameter without a gradient is not updated (nor decayed), as torch's AdamW."""
    from toolkit.engines.megatron.dist_optimizer import DistributedOptimizer

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3), torch.nn.Linear(3, 3))
    mine = torch.nn.Sequential(*[torch.nn.Linear(m.in_features, m.out_features) for m in ref])
    mine.load_state_dict(ref.state_dict())
    kw = {"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
    torch_opt = torch.optim.AdamW(ref.parameters(), **kw)
    opt = DistributedOptimizer(dict(mine.named_parameters()), dp_group=None, bucket_elements=30, **kw)
    assert len(opt.buckets) > 2 and all(b.params.dtype == torch.float32 for b in opt.buckets)
    for step in range(3):
        xs = torch.randn(2, 4, 5)
        for model in (ref, mine):
            for i, x in enumerate(xs):
                with opt.no_sync() if model is mine and i == 0 else contextlib.nullcontext():
                    model[1](model[0](x)).pow(2).sum().backward()  # model[2] gets no gradient
        opt.finish_grad_sync()
        assert opt.launched_in_backward > 0 and all(p.grad is None for p in mine.parameters())
        torch_opt.step()
        opt.step()
        torch_opt.zero_grad(set_to_none=True)
        opt.zero_grad()
        for (name, a), b in zip(ref.named_parameters(), mine.parameters()):
            assert (a - b).abs().max() <= 1e-6, (step, name)
    assert opt.steps == {n: 3 if not n.startswith("2.") else 0 for n, _ in mine.named_parameters()}
    assert opt.state_bytes() == 8 * sum(p.numel() for n, p in mine.named_parameters() if not n.startswith("2."))
    # a non-finite gradient shows in the norm the engine's skip reads
    mine[1](mine[0](torch.full((1, 5), float("inf")))).sum().backward()
    opt.finish_grad_sync()
    assert not torch.isfinite(opt.sum_of_squares(lambda name: True)).all()


@pytest.mark.parametrize("engine,parallel,dtype,lora,error", [
    ("megatron", {}, "bfloat16", False, "full fine-tuning needs fp32 master weights"),
    ("megatron", {"distributed_optimizer": True}, "bfloat16", False, None),
    ("megatron", {"distributed_optimizer": True}, "float32", True, None),
    ("hf", {"distributed_optimizer": True}, "float32", True, "engine=hf has no distributed optimizer"),
])
def test_recipes_accepted_and_refused(engine, parallel, dtype, lora, error):
    from toolkit.config import ConfigError
    from toolkit.engines.spec import validate_run

    cfg = config_from_dict({
        "output_dir": "x", "engine": engine, "parallel": parallel, "model": {"path": "x", "dtype": dtype},
        "stages": [{"name": "s", "objective": {"kind": "simcse"}, "steps": 1, "data": {"path": "x"},
                    "lora": {"enabled": lora}, "precision": "bf16"}]})
    if error is None:
        validate_run(cfg)
    else:
        with pytest.raises(ConfigError, match=error):
            validate_run(cfg)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 3 torchrun runs
def test_cli_bf16_full_fine_tuning_resumes_exactly(tmp_path):
    """`embedforge train` under torchrun, DP2, bf16 weights + fp32 masters (full MNTP, then LoRA
    supervised): stopped after 2 steps and resumed, it equals the uninterrupted run (the masters
    come back from the checkpoint, not from the rounded bf16 weights)."""
    from tests.helpers import losses, torchrun, two_stage_recipe

    cfg = two_stage_recipe(tmp_path)
    common = ["stages.mntp.data.mode=resampled", "stages.supervised.data.mode=resampled",
              "parallel.distributed_optimizer=true", "model.dtype=bfloat16", "stages.mntp.precision=bf16",
              "stages.supervised.precision=bf16"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    a = torchrun("train", str(cfg), f"output_dir={full}", *common)
    assert a.returncode == 0, a.stderr[-4000:]
    b = torchrun("train", str(cfg), f"output_dir={cut}", *common, "--stop-after-steps", "2")
    assert b.returncode != 0 and "stopped at step 2" in b.stderr, b.stderr[-4000:]
    c = torchrun("train", str(cfg), f"output_dir={cut}", *common)
    assert c.returncode == 0, c.stderr[-4000:]
    want, got = losses(full), losses(cut)
    assert set(want) == {("mntp", s) for s in range(1, 5)} | {("supervised", s) for s in range(1, 4)}
    assert all(abs(got[k] - v) <= 1e-6 for k, v in want.items()), (got, want)
    assert want[("mntp", 4)] < want[("mntp", 1)]
