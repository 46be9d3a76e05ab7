"""Issue 16: a corrupt, received or half-written checkpoint never costs a run, and never runs code.

Checksums recorded at commit are verified before resume and export; `--resume auto` falls back past
a corrupt step; torch files load with weights_only=True; a full disk is one line and leaves the
newest complete step intact."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from tests.helpers import run_config
from toolkit.checkpoint import manager
from toolkit.checkpoint.integrity import sha256_file
from toolkit.errors import CheckpointError
from toolkit.train import Trainer

ONE_STAGE = dict(mntp__steps=4, simcse__steps=1, supervised__steps=1)


def stopped_run(tmp_path: Path, model: Path, stop: int = 3):
    """A run stopped mid-MNTP at `stop` (checkpoints step-2 and step-`stop`); its config and stage dir."""
    cfg = run_config(tmp_path, model, **ONE_STAGE)
    trainer = Trainer(cfg)
    trainer.stop_after_steps = stop
    trainer.run()
    return cfg, Path(cfg.output_dir) / "00-mntp"


def rerecord(step: Path, rel: str) -> None:
    """Update meta.json's checksum of `rel`, as someone who crafted a received checkpoint would."""
    meta = json.loads((step / "meta.json").read_text())
    meta["files"][rel] = {"sha256": sha256_file(step / rel), "bytes": (step / rel).stat().st_size}
    (step / "meta.json").write_text(json.dumps(meta))


def test_corrupt_weights_are_refused_and_auto_falls_back(tiny_llama_dir, tmp_path, caplog):
    from toolkit.engines.export import consolidate

    cfg, stage = stopped_run(tmp_path, tiny_llama_dir)
    meta = json.loads((stage / "step-3" / "meta.json").read_text())
    assert {"trainable.safetensors", "state.pt", "trainer/dp-0.pt"} <= set(meta["files"])
    weights = stage / "step-3" / "trainable.safetensors"
    with open(weights, "r+b") as f:  # 1,000 overwritten bytes, same size
        f.seek(weights.stat().st_size // 2)
        f.write(os.urandom(1000))
    with pytest.raises(CheckpointError, match=r"trainable.safetensors: checksum mismatch \(written .*step-2"):
        Trainer(cfg, resume=str(stage / "step-3")).run()
    with pytest.raises(CheckpointError, match="trainable.safetensors: checksum mismatch"):
        consolidate(stage / "step-3", tmp_path / "exported")
    trainer = Trainer(cfg)  # --resume auto: the newest step that verifies
    trainer.stop_after_steps = 1
    with caplog.at_level(logging.WARNING):
        outcomes = trainer.run()
    assert outcomes[0].steps_done == 3  # resumed at step 2, one step on
    assert "falling back to an older step" in caplog.text


def test_truncated_state_is_a_checkpoint_error(tiny_llama_dir, tmp_path, caplog):
    cfg, stage = stopped_run(tmp_path, tiny_llama_dir, stop=2)
    state = stage / "step-2" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"state.pt: size mismatch"):
        Trainer(cfg, resume=str(stage / "step-2")).run()
    meta = json.loads((stage / "step-2" / "meta.json").read_text())
    del meta["files"]  # a checkpoint written before checksums: loads unverified, a bad file is still one line
    (stage / "step-2" / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError, match=r"state.pt: unreadable .*truncated"):
        Trainer(cfg, resume=str(stage / "step-2")).run()
    assert "written before checkpoints carried checksums" in caplog.text


def test_old_checkpoint_without_checksums_still_resumes(tiny_llama_dir, tmp_path):
    cfg, stage = stopped_run(tmp_path, tiny_llama_dir, stop=2)
    meta = json.loads((stage / "step-2" / "meta.json").read_text())
    del meta["files"]
    (stage / "step-2" / "meta.json").write_text(json.dumps(meta))
    trainer = Trainer(cfg)
    trainer.stop_after_steps = 1
    assert trainer.run()[0].steps_done == 3


class _Poison:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


@pytest.mark.parametrize("target", ["trainer/dp-0.pt", "state.pt"])
def test_poisoned_pickle_never_runs(tiny_llama_dir, tmp_path, target):
    cfg, stage = stopped_run(tmp_path, tiny_llama_dir, stop=2)
    marker = tmp_path / "MARKER"
    step = stage / "step-2"
    torch.save({"rng": _Poison(marker), "loader": {}}, step / target)
    rerecord(step, target)  # checksums alone do not stop a crafted file
    with pytest.raises(CheckpointError, match=rf"{target}: holds .*refused \(loading it could run code\)"):
        Trainer(cfg, resume=str(step)).run()
    assert not marker.exists()


def test_rng_state_file_is_plain_data(tiny_llama_dir, tmp_path):
    _, stage = stopped_run(tmp_path, tiny_llama_dir, stop=2)
    state = torch.load(stage / "step-2" / "trainer" / "dp-0.pt", weights_only=True)
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


# ----------------------------------------------------------------------------- disk space
def fake_steps(stage: Path, sizes: list[int]) -> None:
    for i, size in enumerate(sizes, start=1):
        step = stage / f"step-{i}"
        step.mkdir(parents=True)
        (step / "w.bin").write_bytes(b"x" * size)
        (step / "meta.json").write_text(json.dumps({"step": i, "files": {"w.bin": {"sha256": "-", "bytes": size}}}))
        (step / "COMPLETE").write_text("")


def disk_with(stage: Path, capacity: int):
    """A fake disk of `capacity` bytes holding only the stage's files."""
    usage = namedtuple("usage", "total used free")

    def disk_usage(path):
        used = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        return usage(capacity, used, capacity - used)

    return disk_usage


def test_short_disk_prunes_old_steps_first(tmp_path, monkeypatch):
    stage = tmp_path / "00-mntp"
    fake_steps(stage, [400, 400, 400])
    (stage / ".step-9.partial").mkdir()  # a crashed save's leftover
    (stage / ".step-9.partial" / "w.bin").write_bytes(b"x" * 300)
    monkeypatch.setattr(shutil, "disk_usage", disk_with(stage, 1700))
    tmp = manager.begin_step_dir(stage, 4, rank=0, keep_last=2)
    assert tmp.is_dir() and not (stage / ".step-9.partial").exists()
    assert [n for n, _ in manager.complete_steps(stage)] == [2, 3]  # one old step pruned, the newest kept


def test_short_disk_never_prunes_the_newest_step(tmp_path, monkeypatch):
    stage = tmp_path / "00-mntp"
    fake_steps(stage, [400, 400])
    monkeypatch.setattr(shutil, "disk_usage", disk_with(stage, 600))
    with pytest.raises(CheckpointError, match=r"no space left on device, need 0.00 GB at .*00-mntp"):
        manager.begin_step_dir(stage, 3, rank=0, keep_last=1)
    assert [n for n, _ in manager.complete_steps(stage)] == [2]
    assert not list(stage.glob(".step-*"))


def test_disk_full_mid_save_is_one_line(tiny_llama_dir, tmp_path, monkeypatch):
    from toolkit.engines.hf import HFEngine

    cfg, stage = stopped_run(tmp_path, tiny_llama_dir, stop=2)
    before = sha256_file(stage / "step-2" / "trainable.safetensors")

    def full(self, step_dir):
        (step_dir / "trainable.safetensors").write_bytes(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0")

    monkeypatch.setattr(HFEngine, "save", full)
    trainer = Trainer(cfg)
    trainer.stop_after_steps = 1
    with pytest.raises(CheckpointError, match=r"^no space left on device, need .* GB at .*00-mntp"):
        trainer.run()
    assert not list(stage.glob(".step-*"))
    assert sha256_file(stage / "step-2" / "trainable.safetensors") == before
    manager.verify_step(stage / "step-2")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_real_full_disk(tiny_llama_dir, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        tmp = manager.begin_step_dir(mnt / "00-x", 1, rank=0)
        with pytest.raises(CheckpointError, match=r"^no space left on device, need more than .* at .*00-x"):
            with manager.disk_full_guard(tmp):
                torch.save({"w": torch.zeros(1 << 20)}, tmp / "state.pt")  # 4 MiB on a 2 MiB disk
        assert not tmp.exists()
    finally:
        subprocess.run(["umount", str(mnt)])


def test_old_format_rng_state_still_resumes(tiny_llama_dir, tmp_path):
    import random

    import numpy as np

    cfg, stage = stopped_run(tmp_path, tiny_llama_dir, stop=2)
    path = stage / "step-2" / "trainer" / "dp-0.pt"
    state = torch.load(path, weights_only=True)
    state["rng"]["numpy"], state["rng"]["python"] = np.random.get_state(), random.getstate()  # ndarray tuple
    torch.save(state, path)
    rerecord(stage / "step-2", "trainer/dp-0.pt")
    trainer = Trainer(cfg, resume=str(stage / "step-2"))
    trainer.stop_after_steps = 1
    assert trainer.run()[0].steps_done == 3


@pytest.mark.parametrize("zero_stage,name", [(0, "mp_rank_00_model_states.pt"),
                                             (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_poisoned_deepspeed_file_never_runs(tmp_path, zero_stage, name):
    from toolkit.engines.deepspeed_zero import read_trainable

    folder = tmp_path / "step-1" / "deepspeed"
    (folder / "state").mkdir(parents=True)
    (folder / "zero.json").write_text(json.dumps({"zero_stage": zero_stage, "trainable": ["w"]}))
    marker = tmp_path / "MARKER"
    torch.save({"module": _Poison(marker)}, folder / "state" / name)
    with pytest.raises(CheckpointError, match=rf"{name}: holds .*refused"):
        read_trainable(tmp_path / "step-1")
    assert not marker.exists()
