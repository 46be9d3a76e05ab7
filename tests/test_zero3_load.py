"""DeepSpeed ZeRO-3 loading without a whole model on any rank (`toolkit.engines.zero3_load`).

Proven on 2 gloo processes with a tiny Llama whose embeddings are tied (the frozen MNTP head is then
a copy made from gathered weights):
- the engine builds the backbone already partitioned: every parameter is empty on every rank and
  each rank holds its half; rank 1 never maps the checkpoint file;
- the partitioned weights, gathered, equal the hf engine's whole model bit for bit, the frozen head
  included; a later stage's start (`load_stage_output`) is filled from rank 0's read of the folder and
  equals it bit for bit; a folder whose tensors do not fit is refused on every rank, naming it;
- a whole run (MNTP full fine-tuning, then SimCSE with LoRA) at ZeRO-3 equals the hf engine's run.
Per-rank memory while loading is measured by bench/zero3_load_memory.py (bench/RESULTS.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file

from tests.helpers import free_port, losses, save_tiny_decoder, torchrun, write_data

WORLD = 2


def _run_config(model: Path, out: Path, texts: Path, zero_stage: int = 3, engine: str = "deepspeed") -> dict:
    data = {"path": str(texts), "batch_size": 4, "max_length": 32, "mode": "resampled"}
    return {
        "output_dir": str(out), "seed": 3, "engine": engine, "zero": {"stage": zero_stage},
        "model": {"path": str(model), "max_length": 32}, "pooling": {"mode": "mean"},
        "stages": [
            {"name": "mntp", "steps": 2, "lora": {"enabled": False}, "data": data,
             "objective": {"kind": "mntp", "mntp": {"mask_probability": 0.3, "mask_token": "eos"}},
             "optimizer": {"lr": 1e-3}},
            {"name": "simcse", "steps": 2, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": data,
             "objective": {"kind": "simcse"}, "optimizer": {"lr": 1e-3}},
        ],
        "checkpoint": {"every_steps": 100}, "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
    }


def _file_mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def _worker(rank: int, port: int, model: str, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import deepspeed

    from toolkit.config import config_from_dict
    from toolkit.distributed.parallel_dims import ParallelDims, init_distributed
    from toolkit.engines.spec import build_engine
    from toolkit.errors import CheckpointError
    from toolkit.run_layout import RunLayout

    tmp = Path(tmp)
    init_distributed()
    cfg = config_from_dict(_run_config(Path(model), tmp / "run", tmp / "texts"))
    engine = build_engine(cfg, ParallelDims.from_config(cfg.parallel, WORLD, rank))
    engine.build(add_mask_token=False)
    backbone = engine.encoder.backbone
    report: dict = {
        "empty": all(p.numel() == 0 for p in backbone.parameters()),
        "own": sum(p.ds_tensor.numel() for p in backbone.parameters()),
        "total": sum(p.ds_numel for p in backbone.parameters()),
        "mapped": _file_mapped(Path(model) / "model.safetensors"),
    }
    params = [*backbone.parameters(), engine.lm_head.weight]
    with deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")]):
        if rank == 0:
            whole = {f"backbone.{k}": v.clone() for k, v in backbone.state_dict().items()}
            whole["head"] = engine.lm_head.weight.detach().clone()
            save_file(whole, str(tmp / "built.safetensors"))
    # a later stage's start: a folder with other weights, read by rank 0 only
    final = RunLayout(Path(cfg.output_dir)).final_dir(0, "mntp")
    engine.load_stage_output(final)
    with deepspeed.zero.GatheredParameters(list(engine.encoder.backbone.parameters())):
        if rank == 0:
            save_file({k: v.clone() for k, v in engine.encoder.backbone.state_dict().items()},
                      str(tmp / "loaded.safetensors"))
    torch.distributed.barrier()
    if rank == 0:  # the stage's folder replaced by one whose tensors do not fit the model
        final.rename(final.with_name("good"))
        (tmp / "other").rename(final)
    torch.distributed.barrier()
    try:  # refused on every rank (none is left waiting in a gather)
        engine.load_stage_output(final)
        report["refused"] = None
    except CheckpointError as e:
        report["refused"] = str(e)
    (tmp / f"report-{rank}.json").write_text(json.dumps(report))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_builds_partitioned_and_equals_the_whole_model(tmp_path):
    from toolkit.models.loading import build_encoder

    texts, _ = write_data(tmp_path)
    (tmp_path / "texts").symlink_to(texts)
    model = save_tiny_decoder(tmp_path / "tied", "llama", num_hidden_layers=2, tie_word_embeddings=True)
    from toolkit.config import config_from_dict

    cfg = config_from_dict(_run_config(model, tmp_path / "run", texts))
    whole, head = build_encoder(cfg.model, cfg.pooling, seed=cfg.seed)
    # the next stage's start: the model's backbone moved, saved as the stage's final encoder folder
    final = tmp_path / "run" / "00-mntp" / "final"
    with torch.no_grad():
        for p in whole.backbone.parameters():
            p.add_(0.01)
    whole.save_pretrained(final)
    moved = load_file(str(final / "model.safetensors"))
    bad = tmp_path / "other"  # a folder of another model: a wider MLP
    other, _ = build_encoder(config_from_dict(_run_config(
        save_tiny_decoder(tmp_path / "wide", "llama", num_hidden_layers=2, intermediate_size=96), tmp_path / "x",
        texts)).model, cfg.pooling)
    other.save_pretrained(bad)
    whole, head = build_encoder(cfg.model, cfg.pooling, seed=cfg.seed)  # unmoved: what the engine must build

    mp.start_processes(_worker, args=(free_port(), str(model), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    reports = [json.loads((tmp_path / f"report-{r}.json").read_text()) for r in range(WORLD)]
    total = sum(p.numel() for p in whole.backbone.parameters())
    for rank, r in enumerate(reports):
        assert r["empty"], rank  # partitioned from construction: no rank holds a whole parameter
        assert r["total"] == total and r["own"] <= -(-total // WORLD) + 64 * len(list(whole.backbone.parameters()))
        assert r["refused"] and str(final) in r["refused"] and "shape" in r["refused"], r
    assert not reports[1]["mapped"]  # only rank 0 reads the checkpoint
    built = load_file(str(tmp_path / "built.safetensors"))
    for name, value in whole.backbone.state_dict().items():
        assert torch.equal(built[f"backbone.{name}"], value), name
    assert torch.equal(built["head"], head.weight)  # the frozen copy of the tied embeddings
    loaded = load_file(str(tmp_path / "loaded.safetensors"))
    assert loaded.keys() == moved.keys() and all(torch.equal(loaded[k], moved[k]) for k in moved)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_run_with_tied_embeddings_equals_hf_engine(tmp_path):
    texts, _ = write_data(tmp_path)
    model = save_tiny_decoder(tmp_path / "tied", "llama", num_hidden_layers=2, tie_word_embeddings=True)
    runs = {}
    for engine in ("hf", "deepspeed"):
        recipe = tmp_path / f"{engine}.yaml"
        recipe.write_text(yaml.safe_dump(_run_config(model, tmp_path / engine, texts, engine=engine)))
        r = torchrun("train", str(recipe))
        assert r.returncode == 0, r.stderr[-4000:]
        runs[engine] = tmp_path / engine
    want, got = losses(runs["hf"]), losses(runs["deepspeed"])
    assert got.keys() == want.keys() and len(want) == 4
    for key, value in want.items():
        assert abs(got[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, got[key], value)
    for stage in ("00-mntp", "01-simcse"):
        a = load_file(str(runs["hf"] / stage / "final" / "model.safetensors"))
        b = load_file(str(runs["deepspeed"] / stage / "final" / "model.safetensors"))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 2e-5, stage
