"""A DeepSpeed ZeRO-2 / ZeRO-3 checkpoint resumed at another data-parallel size, through DeepSpeed's universal checkpoint.

A ZeRO-2 (and a ZeRO-3) run on 2 gloo ranks stops after 2 of 4 full fine-tuning steps; it resumes on 4 ranks with the
per-rank batch halved (`--resume-with-changes stages.mntp.data.batch_size`: the same global batch).
`load` sees the layout change (dp 2 -> 4), converts the step's checkpoint to DeepSpeed's universal
format in a hidden sibling of the step folder (removed afterwards; the step folder is untouched), and
re-partitions fp32 masters, Adam moments and the LR schedule for 4 ranks.

The reference is the `hf` engine on the same path (2 ranks stopped at step 2, resumed on 4 with the same
change): its checkpoint is the full optimizer state, so it reshards exactly, and the loader's data order
after the DP change is engine-independent. ZeRO-2/3 equal hf within 1e-5 per step
(tests/test_deepspeed_engine.py), so lost or mis-sliced moments would show here as diverging losses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.helpers import losses, save_tiny_decoder, torchrun, write_data

# the override before the option (nargs="+" takes every following word as a key)
CHANGE = ["stages.mntp.data.batch_size=2", "--resume-with-changes", "stages.mntp.data.batch_size"]


def recipe(tmp_path: Path) -> Path:
    texts, _ = write_data(tmp_path)
    model = save_tiny_decoder(tmp_path / "tiny-llama", "llama", num_hidden_layers=2)
    cfg = {
        "output_dir": "unset", "seed": 5, "engine": "deepspeed", "zero": {"stage": 2},
        "model": {"path": str(model), "max_length": 48},
        "pooling": {"mode": "mean"},
        "stages": [
            {"name": "mntp", "steps": 4, "lora": {"enabled": False},
             "data": {"path": str(texts), "batch_size": 4, "max_length": 48, "mode": "resampled"},
             "objective": {"kind": "mntp", "mntp": {"mask_probability": 0.3, "mask_token": "eos"}},
             "optimizer": {"lr": 1e-3, "weight_decay": 0.01}, "schedule": {"warmup_steps": 1}},
        ],
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
    }
    path = tmp_path / "ds-universal.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def sliced_run(cfg: Path, run: Path, *overrides: str) -> None:
    """2 ranks stopped after step 2, then resumed on 4 ranks with half the per-rank batch."""
    a = torchrun("train", str(cfg), f"output_dir={run}", *overrides, "--stop-after-steps", "2")
    assert a.returncode != 0 and "stage mntp: stopped at step 2" in a.stderr, a.stderr[-4000:]
    b = torchrun("train", str(cfg), f"output_dir={run}", *overrides, *CHANGE, nproc=4)
    assert b.returncode == 0, b.stderr[-4000:]
    if "engine=hf" not in overrides:
        assert "through DeepSpeed's universal checkpoint" in b.stderr, b.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_zero_resumes_at_another_data_parallel_size(tmp_path):
    """ZeRO-2 and ZeRO-3, DP 2 -> 4 (same global batch): losses and final weights equal the hf reference's
    (measured: identical losses; weights within 1.5e-7 (ZeRO-2), 4.5e-7 (ZeRO-3))."""
    cfg = recipe(tmp_path)
    runs = {"hf": ["engine=hf"], "zero2": ["zero.stage=2"], "zero3": ["zero.stage=3"]}
    for name, overrides in runs.items():
        sliced_run(cfg, tmp_path / name, *overrides)
    want = losses(tmp_path / "hf")
    assert set(want) == {("mntp", s) for s in range(1, 5)}
    wa = load_file(str(tmp_path / "hf" / "00-mntp" / "final" / "model.safetensors"))
    for name, stage_no in (("zero2", 2), ("zero3", 3)):
        stage = tmp_path / name / "00-mntp"
        layout = json.loads((stage / "step-2" / "deepspeed" / "zero.json").read_text())
        assert (layout["zero_stage"], layout["dp"]) == (stage_no, 2)  # written at DP 2, read at DP 4
        assert not [p.name for p in stage.iterdir() if p.name.startswith(".")]  # the conversion was cleaned up
        got = losses(tmp_path / name)
        assert set(got) == set(want)
        rel = {k: abs(got[k] - v) / max(1.0, abs(v)) for k, v in want.items()}
        print(name, "relative loss differences", rel)
        assert max(rel.values()) <= 1e-5, (name, rel)
        wb = load_file(str(stage / "final" / "model.safetensors"))
        diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        print(name, "max final weight difference", diff)
        assert diff <= 2e-5, name


def test_universal_refusals_name_the_reason():
    from toolkit.engines.deepspeed_zero import universal_refusal

    base = {"zero_stage": 2, "dp": 2, "bf16": False, "trainable": ["a", "b"]}
    assert universal_refusal(base, {**base, "dp": 4}) is None
    assert universal_refusal({**base, "zero_stage": 3}, {**base, "zero_stage": 3, "dp": 8}) is None
    assert "another ZeRO stage (2 -> 3)" in universal_refusal(base, {**base, "zero_stage": 3, "dp": 4})
    assert "ZeRO-0" in universal_refusal({**base, "zero_stage": 0}, {**base, "dp": 4})
    assert "single rank" in universal_refusal(base, {**base, "dp": 1})
    assert "bf16" in universal_refusal(base, {**base, "dp": 4, "bf16": True})
    assert "trainable" in universal_refusal(base, {**base, "dp": 4, "trainable": ["a"]})
