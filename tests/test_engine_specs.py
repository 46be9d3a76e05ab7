"""Engine specs: one registry, one pre-flight, one description of a model.

- Registering an engine name twice is an error; nothing outside toolkit/engines/ names an engine.
- `embedforge plan` and `embedforge train` refuse the same recipes with the same message, before any
  weight is read (the model folders here hold only a config.json: a run that got as far as loading
  weights would fail differently).
- The planner's parameter counts are the megatron engine's real ones, per rank, at TP 2 and PP 2,
  full fine-tuning and LoRA (multi-process, gloo).
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from launchers.cli import main
from tests.helpers import free_port, save_tiny_decoder
from toolkit.config import config_from_dict
from toolkit.engines.spec import EngineSpec, engine_names, engine_spec, register_engine
from toolkit.models.arch import ModelArgs
from toolkit.models.tiny import tiny_config
from toolkit.planner import plan_stage

ROOT = Path(__file__).resolve().parents[1]


def test_registering_an_engine_twice_is_an_error():
    hf = engine_spec("hf")
    with pytest.raises(RuntimeError, match="engine 'hf' is registered twice"):
        register_engine(EngineSpec(name="hf", engine_cls=hf.engine_cls, parallel_dims=frozenset({"dp"}),
                                   export_step=hf.export_step))
    assert engine_spec("hf") is hf and engine_names() == ["deepspeed", "hf", "megatron"]


def test_nothing_outside_engines_names_an_engine():
    """Code outside toolkit/engines/ asks the registry; an engine's name appears only as the config's default."""
    names = set(engine_names())
    allowed = {("toolkit/config.py", "hf")}  # RunConfig.engine's default
    found = []
    for folder in ("toolkit", "launchers", "cluster", "data_pipelines"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("toolkit/engines/"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in names and (rel, node.value) not in allowed:
                    found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, found


# ---------------------------------------------------------------------------------------------- pre-flight
def _config_only(folder: Path, model_type: str = "llama", **overrides) -> Path:
    """A model folder with a config.json and no weights."""
    tiny_config(model_type, **overrides).save_pretrained(folder)
    assert not any(p.suffix == ".safetensors" for p in folder.iterdir())
    return folder


def _recipe(tmp_path: Path, model: Path, *, engine="megatron", tp=1, dtype="float32", lora=True) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "engine": engine, "parallel": {"tp": tp},
        "model": {"path": str(model), "dtype": dtype, "max_length": 32},
        "stages": [{"name": "mntp", "steps": 1, "objective": {"kind": "mntp", "mntp": {"mask_token": "eos"}},
                    "data": {"path": str(tmp_path / "no-data")}, "lora": {"enabled": lora}}],
    }))
    return path


CASES = {  # name: (model config overrides, recipe overrides, gpus, expected message part)
    "bf16 full fine-tuning": ({}, {"dtype": "bfloat16", "lora": False}, 1, "full fine-tuning needs fp32 master weights"),
    "tp vs heads": ({}, {"tp": 3}, 3, "parallel.tp=3: num_attention_heads=4 is not divisible by tp"),
    "tp vs ffn": ({"num_key_value_heads": 4, "intermediate_size": 130}, {"tp": 4}, 4,
                  "parallel.tp=4: intermediate_size=130 is not divisible by tp"),
    "family": ({"model_type": "gemma"}, {}, 1, "model_type='gemma' is not supported here"),
    "qkv bias outside qwen2": ({"attention_bias": True}, {}, 1, "biases other than Qwen2's q/k/v bias are not supported"),
}


@pytest.mark.parametrize("case", CASES)
def test_plan_and_train_refuse_the_same_recipe_with_the_same_message(case, tmp_path, capsys):
    model_over, recipe_over, gpus, expected = CASES[case]
    model_over = dict(model_over)
    model = _config_only(tmp_path / "model", model_over.pop("model_type", "llama"), **model_over)
    recipe = _recipe(tmp_path, model, **recipe_over)
    assert main(["plan", str(recipe), "--gpus", str(gpus)]) == 2
    plan_err = capsys.readouterr().err.strip()
    assert main(["train", str(recipe)]) == 2
    train_err = capsys.readouterr().err.strip()
    assert expected in plan_err and "\n" not in plan_err and "\n" not in train_err
    assert plan_err.split("error: ", 1)[1] == train_err.split("error: ", 1)[1]
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run folder was written


def test_the_padded_vocabulary_never_refuses_a_tp(tmp_path, capsys):
    """A vocabulary that TP does not divide is padded (masked logits): plans and validates at TP 2."""
    model = _config_only(tmp_path / "model", vocab_size=257)
    assert main(["plan", str(_recipe(tmp_path, model, tp=2)), "--gpus", "2"]) == 0
    assert ModelArgs.from_dict(json.loads((model / "config.json").read_text())).padded_vocab(2) == 258


# ---------------------------------------------------------------------------------------------- counts
def _counts_cfg(model_dir: str, tp: int, pp: int, lora: bool):
    return config_from_dict({
        "output_dir": "unused", "engine": "megatron", "parallel": {"tp": tp, "pp": pp},
        "model": {"path": model_dir, "max_length": 32}, "pooling": {"mode": "pma", "num_seeds": 2},
        "stages": [{"name": "s", "steps": 1, "objective": {"kind": "mntp", "mntp": {"mask_token": "eos"}},
                    "data": {"path": "unused"}, "lora": {"enabled": lora, "r": 4}}],
    })


def _count_worker(rank: int, world: int, port: int, model_dir: str, tp: int, pp: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from toolkit.distributed.parallel_dims import ParallelDims
        from toolkit.engines.spec import build_engine

        rows = []
        for lora in (False, True):
            cfg = _counts_cfg(model_dir, tp, pp, lora)
            dims = ParallelDims.from_config(cfg.parallel, world, rank)
            engine = build_engine(cfg, dims)
            engine.build(add_mask_token=False)
            engine.begin_stage(0, cfg.stages[0], data_kind="text", generator=torch.Generator())
            held = sum(p.numel() for p in engine.model.parameters())
            held += sum(p.numel() for p in engine.lora.parameters()) if engine.lora is not None else 0
            held += sum(p.numel() for p in engine.encoder.pooling.parameters()) if dims.is_last_stage else 0
            trainable = sum(p.numel() for p in engine.params.values())
            rows.append({"lora": lora, "pp_rank": dims.pp_rank, "params": held, "trainable": trainable})
        with open(f"{out}.{rank}", "w") as f:
            json.dump(rows, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("model_type,tp,pp", [("llama", 2, 1), ("qwen2", 1, 2)])
def test_planner_counts_are_the_megatron_engines_counts(tmp_path, model_type, tp, pp):
    model_dir = save_tiny_decoder(tmp_path / "model", model_type, num_hidden_layers=4)
    out = tmp_path / "counts"
    mp.spawn(_count_worker, args=(tp * pp, free_port(), str(model_dir), tp, pp, str(out)), nprocs=tp * pp, join=True)
    args = ModelArgs.from_dict(json.loads((model_dir / "config.json").read_text()))
    for rank in range(tp * pp):
        for row in json.loads(Path(f"{out}.{rank}").read_text()):
            cfg = _counts_cfg(str(model_dir), tp, pp, row["lora"])
            stage = plan_stage(cfg, cfg.stages[0], args, gpus=tp * pp, gpu_mem_gib=80).stages[row["pp_rank"]]
            assert (row["params"], row["trainable"]) == (stage.params, stage.trainable), (rank, row)
