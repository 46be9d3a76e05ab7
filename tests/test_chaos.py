"""Chaos: `embedforge train` SIGKILLed again and again at random moments (in steps, in checkpoint writes,
at a stage's end), each time continued with `--resume auto`, ends exactly where an uninterrupted run
ends: every stage's final/model.safetensors bit-identical, the same loss at every step. The kill
schedule comes from a fixed seed, so a failure reproduces."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import EMBEDFORGE, losses, run_config, run_embedforge, subprocess_env
from toolkit.config import to_dict

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
SEED = 20261206
KILLS = 6  # attempts; at least 3 must be killed before the run finishes
STAGES = ("00-mntp", "01-simcse")


def recipe(tmp_path: Path, model_dir: Path) -> Path:
    """2 stages (MNTP 6 steps, SimCSE 4 steps of 2 micro-batches), a checkpoint after every step."""
    cfg = to_dict(run_config(tmp_path, model_dir, "unset"))
    cfg["stages"] = cfg["stages"][:2]
    cfg["stages"][0]["steps"] = 6
    cfg["checkpoint"] = {"every_steps": 1, "keep_last": 2}
    cfg["logging"]["tensorboard"] = False
    path = tmp_path / "chaos.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def steps_logged(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def landed(out: Path, stale: set[str]) -> str:
    """Where a kill landed, for the test's report: the steps logged so far and any save under way."""
    partial = sorted(p.parent.name + "/" + p.name for p in writes(out, "step") + writes(out, "final")
                     if str(p) not in stale)
    return f"after {steps_logged(out)} logged steps" + (f", writing {', '.join(partial)}" if partial else "")


def writes(out: Path, what: str) -> list[Path]:
    """Saves under way: a step-N/ being written (`.step-N.partial`) or a stage's final/ (`.final.tmp-*`)."""
    return list(out.glob("*/.step-*.partial" if what == "step" else "*/.final.tmp-*"))


def train_and_kill(cfg: Path, out: Path, rng: random.Random, log: Path, spots: list[str]) -> int | None:
    """Start `train --resume auto` and SIGKILL its process group: once it logs 1-3 new steps and a random
    0-0.1 s more (in a step, a save or a stage's end), or as soon as a step-N/ or a final/ is being written.
    A write can finish between two looks (a tiny model's final/ takes milliseconds): a run that logged
    3 new steps without one being seen is killed there, so every attempt lands before the run ends.
    Returns the exit code when it finished first, None when it was killed."""
    before = steps_logged(out) + rng.randint(1, 3) - 1
    in_save = rng.choice([None, None, "step", "final"])
    stale = {str(p) for p in writes(out, "step") + writes(out, "final")}  # left by earlier kills
    with log.open("a") as sink:
        proc = subprocess.Popen([EMBEDFORGE, "train", str(cfg), f"output_dir={out}", "--resume", "auto"],
                                stdout=sink, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        backstop = steps_logged(out) + 3
        while proc.poll() is None and time.monotonic() < deadline and not (
                {str(p) for p in writes(out, in_save)} - stale if in_save else steps_logged(out) > before) \
                and not (in_save and steps_logged(out) >= backstop):
            time.sleep(0.005 if in_save else 0.02)
        time.sleep(0.0 if in_save else rng.uniform(0.0, 0.1))  # a tiny step takes ~10-100 ms
        if proc.poll() is not None:
            return proc.returncode
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started: the trainer and any loader workers
        spots.append(landed(out, stale))
        proc.wait(timeout=60)
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_repeated_sigkill_and_auto_resume_end_bit_identical(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = recipe(tmp_path, tiny_llama_dir)
    ref = run_embedforge("train", str(cfg), f"output_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-3000:]

    out, rng, log, kills, spots = tmp_path / "chaos", random.Random(SEED), tmp_path / "chaos.log", 0, []
    for _ in range(KILLS):
        code = train_and_kill(cfg, out, rng, log, spots)
        if code is not None:  # finished before the kill landed
            assert code == 0, log.read_text()[-3000:]
            break
        kills += 1
    last = run_embedforge("train", str(cfg), f"output_dir={out}", "--resume", "auto")
    assert last.returncode == 0, (last.stderr[-3000:], log.read_text()[-3000:])
    assert kills >= 3, f"only {kills} kills landed before the run finished: {spots}"

    want, got = losses(tmp_path / "ref"), losses(out)  # the last record of each step: the final trajectory
    assert got == want, sorted(set(got.items()) ^ set(want.items()))
    for stage in STAGES:
        a, b = (load_file(str(run / stage / "final" / "model.safetensors")) for run in (out, tmp_path / "ref"))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), stage
    print(f"{kills} SIGKILLs survived ({'; '.join(spots)}); {len(got)} steps, final weights bit-identical")
