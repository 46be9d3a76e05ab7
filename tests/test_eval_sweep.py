"""`embedforge eval sweep` end to end on real weights and real data (slow; runs in CI).

A short run of the quickstart recipe (real SmolLM2-135M weights, MNTP then SimCSE, a checkpoint at
step 2 of each stage), its two checkpoints and the all-MiniLM-L6-v2 baseline are evaluated on the
local mteb tasks as Ray tasks on a local Ray cluster. The sweep is interrupted (SIGKILL) once some
jobs have written their results; the rerun recomputes none of them (their result files are
untouched, and it evaluates only the missing jobs), and writes the table and the plots.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import EMBEDFORGE, ROOT, subprocess_env

# the module fixture trains the quickstart on real weights (its own limit: 30 min), then two sweeps
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
LOCAL_TASKS = ("EmbedforgeRTSentiment", "EmbedforgeWordNetRetrieval", "EmbedforgeWordNetSameSense")


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("qs") / "run"
    r = subprocess.run([EMBEDFORGE, "train", "configs/quickstart.yaml", f"output_dir={run}", "stages.mntp.steps=4",
                        "stages.simcse.steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
                        "logging.progress=false", "logging.tensorboard=false"],
                       capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def sweep_command(run: Path, out: Path) -> list[str]:
    """Small task sizes: this test is about resuming, not scores (at the default sizes the test took 7.4 min in CI)."""
    return [EMBEDFORGE, "eval", "sweep", "--models", "minilm", "--checkpoints", f"{run}/*/step-*",
            "--output", str(out), "--ray", "local", "--tasks", ",".join(LOCAL_TASKS), "--task-size",
            "rt-sentiment.n_train=400", "rt-sentiment.n_test=200", "wordnet-retrieval.n_queries=150",
            "wordnet-same-sense.n_pairs=200"]


def result_files(cache: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in cache.rglob("Embedforge*.json")}


def test_sweep_over_checkpoints_on_ray_resumes_without_recomputing(quickstart_run, tmp_path):
    out = tmp_path / "sweep"
    env = subprocess_env({"RAY_AUTH_MODE": "disabled"})
    first = subprocess.Popen(sweep_command(quickstart_run, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 1500
    while len(result_files(out / "cache")) < 2 and first.poll() is None:
        assert time.monotonic() < deadline, "no job finished in time"
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)  # the driver, its Ray cluster and workers: an interrupted sweep
    first.wait()
    done = result_files(out / "cache")
    assert 2 <= len(done) < 9, done  # 3 models x 3 tasks: interrupted mid-way

    second = subprocess.run(sweep_command(quickstart_run, out), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=1800)
    assert second.returncode == 0, second.stderr[-4000:]
    after = result_files(out / "cache")
    assert len(after) == 9 and all(after[p] == t for p, t in done.items())  # finished work was not redone

    table = (out / "results.md").read_text()
    run = quickstart_run.name
    for label in ("minilm", f"{run}/mntp/step-2", f"{run}/simcse/step-2"):
        assert f"| {label} |" in table, table
    for task in LOCAL_TASKS:
        assert task in table
    csv_rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 9
    steps = {line.split(",")[0]: line.split(",")[3] for line in csv_rows[1:]}
    assert steps[f"{run}/mntp/step-2"] == "2" and steps[f"{run}/simcse/step-2"] == "6"  # 4 MNTP steps + 2
    for png in ("score_vs_step.png", "heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    third = subprocess.run(sweep_command(quickstart_run, out), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert third.returncode == 0 and result_files(out / "cache") == after  # a finished sweep computes nothing
