"""Failure propagation under `embedforge train --nproc 2` (torchrun): one rank raising in a step or at a
stage's end (the test hook EMBEDFORGE_TEST_FAIL_AT) ends the whole job within seconds, not after the
30-minute collective timeout its peer would otherwise wait in. The Ray counterpart is in
tests/test_ray_cluster.py::test_a_rank_that_raises_ends_the_run_promptly."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import EMBEDFORGE, run_config, subprocess_env
from toolkit.config import to_dict

pytestmark = pytest.mark.slow
BOUND_S = 60  # from the injected failure to the command's exit; the collective timeout is 30 minutes


def recipe(tmp_path: Path, model_dir: Path) -> Path:
    """The 2-stage hf recipe (MNTP, SimCSE) with resampled streams: one shard per dataset, 2 ranks."""
    cfg = to_dict(run_config(tmp_path, model_dir, "run"))
    cfg["stages"] = cfg["stages"][:2]
    for stage in cfg["stages"]:
        stage["data"]["mode"] = "resampled"
    cfg["logging"]["tensorboard"] = False
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_failing(cfg: Path, fail_at: str, log: Path) -> tuple[int, float]:
    """(exit code, seconds from the injected failure's message to the exit) of `train --nproc 2`."""
    with log.open("w") as out:
        proc = subprocess.Popen([EMBEDFORGE, "train", str(cfg), "--nproc", "2"], stdout=out, stderr=subprocess.STDOUT,
                                env=subprocess_env({"EMBEDFORGE_TEST_FAIL_AT": fail_at}))
        failed_at = None
        try:
            while proc.poll() is None:
                if failed_at is None and "injected failure" in log.read_text(errors="replace"):
                    failed_at = time.monotonic()
                if time.monotonic() - (failed_at or time.monotonic()) > 5 * BOUND_S:
                    break
                time.sleep(0.1)
            code = proc.wait(timeout=5) if proc.poll() is None else proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"still running {5 * BOUND_S} s after the failure:\n{log.read_text()[-3000:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
    assert failed_at is not None, log.read_text()[-3000:]
    return code, time.monotonic() - failed_at


@pytest.mark.parametrize("fail_at", ["1:mntp:2", "1:mntp:end", "0:simcse:1"])
def test_a_rank_that_raises_ends_the_torchrun_job_promptly(tiny_llama_dir, tmp_path, fail_at):
    """Rank 1 raising in a step (its peer waits in the stop-flag all-reduce), at a stage's end (its peer
    merges and saves: gathers), and rank 0 raising in the second stage."""
    cfg = recipe(tmp_path, tiny_llama_dir)
    code, seconds = run_failing(cfg, fail_at, tmp_path / "train.log")
    text = (tmp_path / "train.log").read_text(errors="replace")
    assert code != 0, text[-3000:]
    assert seconds < BOUND_S, (seconds, text[-3000:])
    print(f"{fail_at}: exit {code} {seconds:.1f} s after the failure")
