"""The `embedforge` CLI end to end on a tiny model: train, encode, export, eval, and its errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from launchers.cli import main
from tests.helpers import CORPUS


def recipe(tmp_path, model_dir):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(f"{t} {i}" for i, t in enumerate(CORPUS)) + "\n")
    shards = tmp_path / "shards"
    assert main(["data", "build", "--input", str(data), "--output", str(shards), "--kind", "text"]) == 0
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(model_dir), "max_length": 192},
        "pooling": {"mode": "weighted_mean"},
        "stages": [{"name": "simcse", "objective": {"kind": "simcse"}, "steps": 2,
                    "data": {"path": str(shards), "batch_size": 4, "max_length": 32},
                    "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}}],
        "logging": {"progress": False, "tensorboard": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("command", [[], ["train"], ["encode"], ["export"], ["eval"], ["quickstart"]])
def test_help(command):
    out = subprocess.run([sys.executable, "-m", "launchers.cli", *command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: embedforge" in out.stdout


def test_train_encode_export_eval(tiny_llama_dir, tmp_path, capsys):
    path = recipe(tmp_path, tiny_llama_dir)
    assert main(["train", str(path)]) == 0
    final = tmp_path / "run" / "00-simcse" / "final"
    assert (final / "embedforge.json").is_file()

    texts = tmp_path / "in.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS[:5]))
    assert main(["encode", "--model", str(final), "--input", str(texts), "--output", str(tmp_path / "e.npy"),
                 "--instruction", "find the dog", "--dim", "16"]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (5, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # bf16 weights: float32 embeddings close to the fp32 ones; a device this machine lacks: one line
    assert main(["encode", "--model", str(final), "--input", str(texts), "--output", str(tmp_path / "b.npy"),
                 "--instruction", "find the dog", "--dim", "16", "--dtype", "bfloat16", "--device", "cpu"]) == 0
    bf16 = np.load(tmp_path / "b.npy")
    assert bf16.dtype == np.float32 and (bf16 * emb).sum(axis=1).min() > 0.99
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main(["encode", "--model", str(final), "--input", str(texts), "--output", str(tmp_path / "c.npy"),
                     "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--device=cuda: CUDA is not available here" in err and "\n" not in err
        assert not (tmp_path / "c.npy").exists()

    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "exp")]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "exp")]) == 2
    assert "already exists" in capsys.readouterr().err

    assert main(["eval", "run", "--models", str(tmp_path / "exp"), "--tasks", "wordnet-retrieval",
                 "--cache", str(tmp_path / "cache"), "--output", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["model"], r["task"], r["metric"]) for r in rows] == [
        (str(tmp_path / "exp"), "EmbedforgeWordNetRetrieval", "ndcg_at_10")]
    assert 0.0 <= rows[0]["score"] <= 100.0


def test_errors_are_one_clear_line(tiny_llama_dir, tmp_path, capsys):
    path = recipe(tmp_path, tiny_llama_dir)
    assert main(["train", str(path), "stages.simcse.objective.temprature=0.1"]) == 2
    err = capsys.readouterr().err
    assert "stages[0].objective.temprature: unknown key" in err and str(path) in err
    assert main(["train", str(path), "model.path=/nonexistent/model"]) == 2
    assert "/nonexistent/model" in capsys.readouterr().err
    assert main(["encode", "--model", str(tmp_path), "--input", str(tmp_path / "x.txt"), "--output", "o.npy"]) == 2
    assert "x.txt: input file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    assert main(["train", str(path), f"stages.simcse.data.path={bad}"]) == 2
    assert f"{bad}: a file, not a shard folder (data.path)" in capsys.readouterr().err
    assert main(["data", "build", "--input", str(bad), "--output", str(tmp_path / "bad-shards"), "--kind", "text"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err and not (tmp_path / "bad-shards").exists()


@pytest.mark.parametrize("argv", [
    ["train", "r.yaml", "--resume", "never", "stages.mntp.steps=3", "seed=2"],
    ["train", "r.yaml", "stages.mntp.steps=3", "--resume", "never", "seed=2"],
    ["submit", "slurm", "r.yaml", "--nodes", "2", "stages.mntp.steps=3", "seed=2"],
    ["submit", "ray", "r.yaml", "--workers", "2", "stages.mntp.steps=3", "seed=2"],
    ["plan", "r.yaml", "--gpus", "8", "stages.mntp.steps=3", "seed=2"],
    ["quickstart", "--resume", "never", "stages.mntp.steps=3", "seed=2"],
    ["d2llm", "quickstart", "--resume", "never", "stages.mntp.steps=3", "seed=2"],
])
def test_overrides_are_taken_anywhere_on_the_line(argv):
    from launchers.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.overrides == ["stages.mntp.steps=3", "seed=2"]


def test_an_override_after_resume_with_changes_is_refused_not_swallowed(capsys):
    from launchers.cli import main

    assert main(["train", "r.yaml", "--resume-with-changes", "stages.mntp.optimizer.lr", "seed=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume-with-changes seed=2: takes setting names, not overrides" in err and "\n" not in err
