"""`embedforge train ... engine=megatron` under torchrun: a real (tiny) run, resumed at other layouts.

Proves, end to end through the CLI and the trainer: 2 processes train MNTP (full fine-tuning) then
supervised contrastive (LoRA on the merged MNTP model) at TP=2; a second run stops after 2 steps
(checkpoint: megatron dist_checkpointing + per-DP data order), resumes at TP=1 x PP=2 (weights and
Adam moments resharded on load), stops again mid-supervised, and finishes at TP=2 (LoRA adapters
and their moments resharded); its losses equal the uninterrupted run's, and so do the final encoders. A mid-stage
megatron checkpoint exports (resharded to one process) into a folder sentence-transformers loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import CORPUS, save_tiny_decoder
from tests.test_train import write_data

pytestmark = pytest.mark.slow
EMBEDFORGE = str(Path(sys.executable).parent / "embedforge")


def recipe(tmp_path: Path) -> Path:
    texts, pairs = write_data(tmp_path)
    model = save_tiny_decoder(tmp_path / "tiny-llama", "llama", num_hidden_layers=4)
    data = {"batch_size": 4, "max_length": 48}
    cfg = {
        "output_dir": "unset", "seed": 11, "engine": "megatron",
        "model": {"path": str(model), "max_length": 48},
        "pooling": {"mode": "mean"},
        "stages": [
            {"name": "mntp", "steps": 4, "lora": {"enabled": False}, "data": {"path": str(texts), **data},
             "objective": {"kind": "mntp", "mntp": {"mask_probability": 0.3, "mask_token": "eos"}},
             "optimizer": {"lr": 1e-3}, "schedule": {"warmup_steps": 1}},
            {"name": "supervised", "steps": 3, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
             "data": {"path": str(pairs), **data},
             "objective": {"kind": "supervised", "temperature": 0.05}, "optimizer": {"lr": 1e-3}},
        ],
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
    }
    path = tmp_path / "megatron-tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           EMBEDFORGE, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def losses(run: Path) -> dict[tuple[str, int], float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["stage"], r["step"]): r["loss"] for r in rows}


def test_torchrun_train_and_resume_at_another_layout(tmp_path):
    cfg = recipe(tmp_path)
    full, sliced = tmp_path / "full", tmp_path / "sliced"
    a = torchrun("train", str(cfg), f"output_dir={full}", "parallel.tp=2")
    assert a.returncode == 0, a.stderr[-4000:]
    b = torchrun("train", str(cfg), f"output_dir={sliced}", "parallel.tp=2", "--stop-after-steps", "2")
    # stopped with a checkpoint, not finished: exit 3 per rank, which torchrun reports as a failure
    assert b.returncode != 0 and "stopped at step 2" in b.stderr, b.stderr[-4000:]
    assert (sliced / "00-mntp" / "step-2" / "COMPLETE").is_file()
    c = torchrun("train", str(cfg), f"output_dir={sliced}", "parallel.tp=1", "parallel.pp=2", "--stop-after-steps", "2")
    assert c.returncode != 0 and "stage supervised: stopped at step 2" in c.stderr, c.stderr[-4000:]
    assert "resharded" in c.stderr  # full fine-tuning weights + Adam moments, TP2 -> PP2
    d = torchrun("train", str(cfg), f"output_dir={sliced}", "parallel.tp=2")
    assert d.returncode == 0, d.stderr[-4000:]
    assert "resharded" in d.stderr  # LoRA adapters + their Adam moments, PP2 -> TP2

    want, got = losses(full), losses(sliced)
    assert set(want) == {("mntp", s) for s in range(1, 5)} | {("supervised", s) for s in range(1, 4)}
    for key, value in want.items():
        assert abs(got[key] - value) <= 1e-4 * max(1.0, abs(value)), (key, got[key], value)
    assert want[("mntp", 4)] < want[("mntp", 1)]  # it trains

    from toolkit.models.encoder import Encoder

    texts = CORPUS[:6]
    e_full = Encoder.from_pretrained(full / "01-supervised" / "final").encode(texts)
    e_sliced = Encoder.from_pretrained(sliced / "01-supervised" / "final").encode(texts)
    assert np.abs(e_full - e_sliced).max() <= 1e-4


def test_export_of_a_megatron_step_checkpoint(tmp_path):
    cfg = recipe(tmp_path)
    run = tmp_path / "run"
    r = torchrun("train", str(cfg), f"output_dir={run}", "parallel.pp=2", "--stop-after-steps", "2")
    assert r.returncode != 0 and "stopped at step 2" in r.stderr, r.stderr[-4000:]
    out = tmp_path / "exported"
    x = subprocess.run([EMBEDFORGE, "export", "--checkpoint", str(run / "00-mntp" / "step-2"), "--output", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert x.returncode == 0, x.stderr[-4000:]
    from sentence_transformers import SentenceTransformer

    from toolkit.models.encoder import Encoder

    trained = Encoder.from_pretrained(out).encode(CORPUS[:4])
    st = SentenceTransformer(str(out), device="cpu").encode(CORPUS[:4], normalize_embeddings=True)
    assert np.abs(trained - st).max() <= 1e-4


def test_single_process_megatron_run(tmp_path):
    """`embedforge train ... engine=megatron` without torchrun: a one-rank group is made for megatron."""
    cfg = recipe(tmp_path)
    run = tmp_path / "single"
    r = subprocess.run([EMBEDFORGE, "train", str(cfg), f"output_dir={run}", "stages.mntp.steps=2",
                        "stages.supervised.steps=2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (run / "01-supervised" / "final" / "embedforge.json").is_file()
    bad = subprocess.run([EMBEDFORGE, "train", str(cfg), f"output_dir={tmp_path / 'bad'}", "model.dtype=bfloat16"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "full fine-tuning needs fp32 master weights" in bad.stderr, bad.stderr[-2000:]
