"""`embedforge train ... engine=megatron` under torchrun: a real (tiny) run, resumed at other layouts.

Proves, end to end through the CLI and the trainer: 2 processes train MNTP (full fine-tuning) then
supervised contrastive (LoRA on the merged MNTP model) at TP=2; a second run stops after 2 steps
(checkpoint: megatron dist_checkpointing + per-DP data order), resumes at TP=1 x PP=2 (weights and
Adam moments resharded on load), stops again mid-supervised, and finishes at TP=2 (LoRA adapters
and their moments resharded); its losses equal the uninterrupted run's, and so do the final encoders. A mid-stage
megatron checkpoint exports (resharded to one process) into a folder sentence-transformers loads.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from tests.helpers import CORPUS, EMBEDFORGE, losses, torchrun, two_stage_recipe

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1200)  # 4 megatron runs under torchrun
def test_torchrun_train_and_resume_at_another_layout(tmp_path):
    cfg = two_stage_recipe(tmp_path)
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
    cfg = two_stage_recipe(tmp_path)
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
    cfg = two_stage_recipe(tmp_path)
    run = tmp_path / "single"
    r = subprocess.run([EMBEDFORGE, "train", str(cfg), f"output_dir={run}", "stages.mntp.steps=2",
                        "stages.supervised.steps=2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (run / "01-supervised" / "final" / "embedforge.json").is_file()
    bad = subprocess.run([EMBEDFORGE, "train", str(cfg), f"output_dir={tmp_path / 'bad'}", "model.dtype=bfloat16"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "full fine-tuning needs fp32 master weights" in bad.stderr, bad.stderr[-2000:]
