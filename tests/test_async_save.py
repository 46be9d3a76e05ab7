"""Checkpoints at scale: async save, fully parallel save, and the deadline that counts save time.

Unit tests (fast): the trainer's save tracker commits an async save only once its write is done and
abandons it cleanly; engines without async save refuse the setting; the deadline backstop keeps
room for the slowest save. Multi-process (slow, DP2 under torchrun, real megatron-core under gloo):
every DP replica writes about half of a step and the step loads at another layout with the same
weights as one written by replica 0 alone; an async step is byte-identical to a sync one and
resumes to the uninterrupted run; kill -9 of a rank while an async save is in flight leaves either
no new step or a COMPLETE one that verifies and loads; a rank's error abandons the save in flight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import EMBEDFORGE, losses, run_config, subprocess_env, two_stage_recipe
from toolkit.checkpoint.manager import complete_steps, verify_step
from toolkit.checkpoint.pending import SaveHandle, SaveTracker
from toolkit.config import ConfigError, config_from_dict, to_dict
from toolkit.engines.megatron.async_save import TEST_SLOW_ENV
from toolkit.engines.spec import validate_run
from toolkit.run_layout import COMPLETE
from toolkit.train import Trainer

DP2 = ("stages.mntp.data.mode=resampled", "stages.supervised.data.mode=resampled")


# ------------------------------------------------------------------------------------ unit tests
class FakeAsync(SaveHandle):
    """A write that finishes when the test says so."""

    asynchronous = True

    def __init__(self) -> None:
        self.finished = self.abandoned = self.verified = False

    def done(self, *, wait: bool) -> bool:
        self.finished = self.finished or wait
        return self.finished

    def verify(self) -> None:
        self.verified = True

    def abandon(self) -> None:
        self.abandoned = True


def partial_step(stage: Path, step: int) -> Path:
    tmp = stage / f".step-{step}.partial"
    tmp.mkdir(parents=True)
    (tmp / "weights.bin").write_bytes(b"x" * 10)
    return tmp


def test_tracker_commits_an_async_save_only_when_its_write_is_done(tmp_path):
    saves = SaveTracker(rank=0, keep_last=2)
    handle = FakeAsync()
    assert saves.started(handle, partial_step(tmp_path, 2), {"step": 2}, time.perf_counter()) is None
    assert saves.in_flight and saves.poll() is None and complete_steps(tmp_path) == []
    with pytest.raises(RuntimeError, match="another one is in flight"):
        saves.started(FakeAsync(), tmp_path / ".step-4.partial", {"step": 4}, time.perf_counter())
    handle.finished = True
    final = saves.poll()  # verified in the loop; checksums, COMPLETE and the rename in a thread on rank 0
    assert final == tmp_path / "step-2" and handle.verified
    assert saves.finish() is None and (final / COMPLETE).is_file()  # finish() joins that thread
    verify_step(final)
    assert not saves.in_flight and saves.slowest_s > 0 and len(saves.held_s) == 1

    other = FakeAsync()
    saves.started(other, partial_step(tmp_path, 4), {"step": 4}, time.perf_counter())
    saves.abandon()  # an error: the write is stopped, nothing is committed
    assert other.abandoned and not saves.in_flight
    assert [n for n, _ in complete_steps(tmp_path)] == [2] and (tmp_path / ".step-4.partial").is_dir()

    sync = SaveHandle()  # a synchronous engine's save is committed at once
    assert saves.started(sync, partial_step(tmp_path, 6), {"step": 6}, time.perf_counter()) == tmp_path / "step-6"


def test_async_save_is_refused_by_engines_without_it(tmp_path):
    cfg = to_dict(run_config(tmp_path, tmp_path / "model"))
    cfg["checkpoint"]["async_save"] = True
    with pytest.raises(ConfigError, match=r"^checkpoint\.async_save: engine=hf saves synchronously only"):
        validate_run(config_from_dict(cfg))
    cfg["engine"] = "megatron"
    for stage in cfg["stages"]:
        stage["objective"]["mntp"]["mask_token"] = "eos"
    validate_run(config_from_dict(cfg))  # megatron has it


def test_deadline_keeps_room_for_the_slowest_save(tmp_path):
    cfg = to_dict(run_config(tmp_path, tmp_path / "model"))
    cfg["checkpoint"]["deadline_margin_s"] = 100.0
    trainer = Trainer(config_from_dict(cfg))
    trainer.slowest_step = 10.0
    trainer.deadline = time.time() + 150  # margin 100 + 2 steps 20 = 120 < 150: go on
    assert not trainer._near_deadline()
    trainer.saves.slowest_s = 40.0  # + the slowest save: 160 > 150, stop (and save) now
    assert trainer._near_deadline()
    trainer.saves.slowest_s = 20.0  # 140 < 150 ...
    assert not trainer._near_deadline()
    trainer.saves.started(FakeAsync(), partial_step(tmp_path / "stage", 2), {"step": 2}, time.perf_counter())
    # ... unless a save is still in flight: the stop waits for it, then saves again
    assert trainer._near_deadline()


# ------------------------------------------------------------------------------------ DP2 runs
def torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun_cmd(*args), capture_output=True, text=True, timeout=600,
                          env=subprocess_env(env))


def _torchrun_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            EMBEDFORGE, "train", args[0], *DP2, *args[1:]]  # overrides before --flags


def rank_bytes(megatron_dir: Path) -> dict[int, int]:
    """Bytes of tensor files each rank wrote (torch_dist names them `__<rank>_<n>.distcp`)."""
    out = {0: 0, 1: 0}
    for f in megatron_dir.glob("__*_*.distcp"):
        rank = int(f.name.split("_")[2])
        out[rank] += f.stat().st_size
    return out


def export(step: Path, out: Path) -> dict[str, torch.Tensor]:
    r = subprocess.run([EMBEDFORGE, "export", "--checkpoint", str(step), "--output", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(out / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The recipe, and its uninterrupted run at DP2 with synchronous, fully parallel saves."""
    tmp = tmp_path_factory.mktemp("async-save")
    cfg = two_stage_recipe(tmp)
    run = tmp / "reference"
    r = torchrun(str(cfg), f"output_dir={run}")
    assert r.returncode == 0, r.stderr[-4000:]
    return cfg, run


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fully_parallel_save_splits_the_writing_and_loads_at_another_layout(reference, tmp_path):
    cfg, run = reference
    parallel = rank_bytes(run / "00-mntp" / "step-2" / "megatron")
    total = sum(parallel.values())
    assert min(parallel.values()) >= 0.35 * total, parallel  # both DP replicas write about half

    alone = tmp_path / "replica0"
    r = torchrun(str(cfg), f"output_dir={alone}", "checkpoint.parallel_save=false", "--stop-after-steps", "2")
    assert r.returncode != 0 and "stopped at step 2" in r.stderr, r.stderr[-4000:]
    single = rank_bytes(alone / "00-mntp" / "step-2" / "megatron")
    assert single[1] == 0 and abs(single[0] - total) <= 0.05 * total, (single, total)  # before: replica 0 writes all
    # Loaded at another layout (one process, DP1): the same weights as replica 0's own checkpoint
    assert_same_weights(export(run / "00-mntp" / "step-2", tmp_path / "x-parallel"),
                        export(alone / "00-mntp" / "step-2", tmp_path / "x-alone"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_async_save_equals_sync_and_resumes_to_the_uninterrupted_run(reference, tmp_path):
    cfg, run = reference
    out = tmp_path / "async"
    a = torchrun(str(cfg), f"output_dir={out}", "checkpoint.async_save=true", "--stop-after-steps", "2")
    assert a.returncode != 0 and "stopped at step 2" in a.stderr, a.stderr[-4000:]
    assert "async; the loop was held" in a.stderr
    files = json.loads((out / "00-mntp" / "step-2" / "meta.json").read_text())["files"]
    want = json.loads((run / "00-mntp" / "step-2" / "meta.json").read_text())["files"]
    data = [k for k in want if k.endswith((".distcp", "common.pt")) or k.startswith("trainer/")]
    assert len(data) >= 6 and {k: files[k] for k in data} == {k: want[k] for k in data}  # byte-identical

    b = torchrun(str(cfg), f"output_dir={out}", "checkpoint.async_save=true")
    assert b.returncode == 0, b.stderr[-4000:]
    assert_same_losses(out, run)


def assert_same_losses(got_run: Path, want_run: Path) -> None:
    want, got = losses(want_run), losses(got_run)
    assert set(got) == set(want)
    for key, value in want.items():
        assert abs(got[key] - value) <= 1e-6 * max(1.0, abs(value)), (key, got[key], value)
    for stage in ("00-mntp", "01-supervised"):
        assert_same_weights(load_file(got_run / stage / "final" / "model.safetensors"),
                            load_file(want_run / stage / "final" / "model.safetensors"))


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kill_rank0_during_save(cfg: Path, out: Path, stage: str) -> None:
    """Start an async run whose writer lingers after writing; SIGKILL rank 0 while `stage`'s step-2
    is in flight (its files written, not yet committed). Checks that rank 0's writer died with it."""
    proc = subprocess.Popen(_torchrun_cmd(str(cfg), f"output_dir={out}", "checkpoint.async_save=true"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env({TEST_SLOW_ENV: "6"}))
    started: list[int] = []
    try:
        tmp = out / stage / ".step-2.partial" / "megatron"
        deadline = time.monotonic() + 300
        while not (list(tmp.glob("__0_*.distcp")) and list(tmp.glob("__1_*.distcp"))):
            assert proc.poll() is None and time.monotonic() < deadline, "no async save in flight"
            time.sleep(0.05)
        time.sleep(0.5)
        rank0 = next(p for p in children(proc.pid) if rank_of(p) == "0")
        started = [rank0, *children(rank0)]
        cmdline = Path(f"/proc/{rank0}/cmdline").read_bytes()
        writers = [p for p in started[1:] if Path(f"/proc/{p}/cmdline").read_bytes() == cmdline]
        assert writers, "rank 0 has no forked writer"
        assert not (out / stage / "step-2" / COMPLETE).exists()  # the kill lands while the save is in flight
        os.kill(rank0, signal.SIGKILL)
        proc.wait(timeout=180)
        time.sleep(1)
        assert not any(alive(p) for p in writers), "rank 0's writer outlived it"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in started:  # e.g. megatron's spawned results-queue manager of the killed rank
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def check_remains(out: Path, tmp_path: Path) -> list[Path]:
    """Every step that is COMPLETE verifies and loads (exports); returns them."""
    found = [p for stage in sorted(out.glob("0*-*")) for _, p in complete_steps(stage)]
    for path in found:
        verify_step(path)
        export(path, tmp_path / f"x-{path.parent.name}-{path.name}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_kill9_during_an_async_save_leaves_no_complete_step_that_fails_to_load(reference, tmp_path):
    cfg, run = reference
    out = tmp_path / "killed"
    kill_rank0_during_save(cfg, out, "00-mntp")
    assert check_remains(out, tmp_path) == []  # step-2 was in flight: no new step
    assert (out / "00-mntp" / ".step-2.partial").is_dir()  # left for the next start to remove

    kill_rank0_during_save(cfg, out, "01-supervised")  # restarts MNTP, finishes it, dies in supervised
    assert [p.name for p in check_remains(out, tmp_path)] == ["step-2"]  # MNTP's, committed after its write

    done = torchrun(str(cfg), f"output_dir={out}", "checkpoint.async_save=true")
    assert done.returncode == 0, done.stderr[-4000:]
    assert not list(out.glob("*/.step-*.partial"))
    assert_same_losses(out, run)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_error_abandons_the_async_save_in_flight(reference, tmp_path):
    """A rank raising while a save is in flight: every rank abandons it (its writer killed, nothing
    committed), the job ends promptly, the step stays a partial that the next start removes."""
    cfg, _ = reference
    out = tmp_path / "failed"
    t0 = time.monotonic()
    r = torchrun(str(cfg), f"output_dir={out}", "checkpoint.async_save=true",
                 env={TEST_SLOW_ENV: "30", "EMBEDFORGE_TEST_FAIL_AT": "1:mntp:3"})
    assert r.returncode != 0 and "injected failure on rank 1" in r.stderr, r.stderr[-4000:]
    assert "abandoning the save in flight" in r.stderr
    assert time.monotonic() - t0 < 120  # the 30 s writer was killed, not waited for
    assert complete_steps(out / "00-mntp") == [] and (out / "00-mntp" / ".step-2.partial").is_dir()
