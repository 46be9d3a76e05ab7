"""`embedforge submit slurm` on a real single-node SLURM cluster (cluster/slurm/local_cluster.sh:
slurmctld + slurmd + munge on this machine, started here; CI runs these tests as root).

- A 2-task training job (hf engine, DP 2, one rank per SLURM task) is requeued mid-run with
  `scontrol requeue`: its ranks save on the SIGTERM, the job runs again, resumes from the newest
  complete checkpoint, and its per-step losses and final weights equal an uninterrupted
  `embedforge train --nproc 2` run's exactly (same layout: bit-identical on CPU).
- The same recipe on Ray inside the allocation (`--launch ray`): a preemption notice to the batch
  shell is relayed to the actors, they save and stop, the script requeues the job itself, and the
  requeued job finishes with the same bit-identical result.
- Bad submissions (unknown partition, invalid recipe) fail before anything is queued.
- A shell-injection attempt in an override does not run, and no secret from the submitting
  environment is written into the script or the job's log.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.helpers import ROOT, losses, run_embedforge, two_stage_recipe

# cluster start (up to 15 min on a cold box), the reference run, requeues held ~2 min by the controller
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster starts slurmctld / slurmd / munged as root")
    r = subprocess.run(["bash", str(ROOT / "cluster/slurm/local_cluster.sh"), "start"], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    yield
    subprocess.run(["scancel", "--name=ef-test"], capture_output=True)


def dp_recipe(tmp_path: Path, mntp_steps: int = 40) -> Path:
    cfg_path = two_stage_recipe(tmp_path)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["engine"] = "hf"
    cfg["stages"][0]["steps"] = mntp_steps  # long enough to be requeued mid-run
    for stage in cfg["stages"]:
        stage["data"]["mode"] = "resampled"  # one shard per dataset, two ranks
    cfg_path.write_text(yaml.safe_dump(cfg))
    return cfg_path


def embedforge(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_embedforge(*args, env=env, timeout=900, cwd=ROOT)


def job_state(job: str) -> str:
    r = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    fields = dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)
    return fields.get("JobState", "GONE")


def wait_for(predicate, what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The recipe and its uninterrupted run (`embedforge train --nproc 2`: the same DP layout)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = dp_recipe(tmp)
    whole = tmp / "whole"
    a = embedforge("train", str(cfg), f"output_dir={whole}", "--nproc", "2")
    assert a.returncode == 0, a.stderr[-4000:]
    return cfg, whole


def submit_and_interrupt(cfg: Path, run: Path, interrupt: list[str], *extra: str) -> str:
    """Submit a 2-rank job, interrupt it once its first checkpoint exists, let the requeued job run."""
    s = embedforge("submit", "slurm", str(cfg), f"output_dir={run}", "--tasks-per-node", "2",
                   "--job-name", "ef-test", "--time", "00:20:00", *extra)
    assert s.returncode == 0, s.stderr[-3000:]
    job = s.stdout.split()[-1]
    checkpoints = run / "00-mntp"
    wait_for(lambda: any(checkpoints.glob("step-*/COMPLETE")) or job_state(job) not in ("PENDING", "RUNNING"),
             "the first checkpoint")
    assert job_state(job) == "RUNNING", (job_state(job), log_of(run))
    subprocess.run([*interrupt, job], check=True)
    # the local controller holds a requeued job ~2 min (BeginTime) before it may start again: release it
    # once its previous run has left the node (earlier, its start fails with "Job credential revoked")
    wait_for(lambda: job_state(job) == "PENDING", "the requeued job to be pending")
    wait_for(lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip()
             == "idle", "the node to be idle")
    # slurmd refuses a credential created in the same second as the previous run's revocation
    # ("Job credential revoked": the job then FAILS with no output); the controller's own hold avoids it
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"), "the job to end")
    assert job_state(job) == "COMPLETED", log_of(run)[-4000:] + slurm_daemon_lines(job)
    return log_of(run)


def slurm_daemon_lines(job: str) -> str:
    """What slurmctld / slurmd logged about `job` (a launch failure leaves nothing in the job's own log)."""
    state = Path(os.environ.get("EMBEDFORGE_SLURM_DIR", "/var/lib/embedforge-slurm")) / "log"
    lines = [f"{p.name}: {line}" for p in sorted(state.glob("*.log")) for line in p.read_text(errors="replace").splitlines()
             if f"JobId={job}" in line or f"job {job}" in line.lower() or f"StepId={job}." in line]
    return "\n--- slurm daemons ---\n" + "\n".join(lines[-40:])


def assert_same_as_uninterrupted(whole: Path, run: Path) -> None:
    want, got = losses(whole), losses(run)
    assert got == want and len(want) == 43  # 40 MNTP + 3 supervised steps, bit-identical
    x = load_file(str(whole / "01-supervised" / "final" / "model.safetensors"))
    y = load_file(str(run / "01-supervised" / "final" / "model.safetensors"))
    assert all(bool((x[k] == y[k]).all()) for k in x)
    assert not (run / "STOPPED").exists()  # the finished run leaves no stop marker


def test_requeued_job_resumes_to_the_uninterrupted_result(slurm_cluster, reference, tmp_path):
    cfg, whole = reference
    run = tmp_path / "requeued"
    out = submit_and_interrupt(cfg, run, ["scontrol", "requeue"])
    assert "restart 1" in out and "resumed from" in out, out[-4000:]
    assert "saving a checkpoint at the next step boundary" in out  # the ranks caught the SIGTERM
    assert_same_as_uninterrupted(whole, run)


def test_ray_on_slurm_preemption_notice_is_relayed_and_requeued(slurm_cluster, reference, tmp_path):
    """--launch ray: the notice (here sent by hand, as --signal=B:TERM would) reaches the batch shell,
    which relays it as STOP_REQUESTED; the actors save and stop, the script sees STOPPED and requeues."""
    cfg, whole = reference
    run = tmp_path / "ray"
    out = submit_and_interrupt(cfg, run, ["scancel", "--batch", "--signal=TERM"], "--launch", "ray")
    assert "preemption notice: asking the run to save and stop" in out, out[-4000:]
    assert "stage mntp: stopped at step" in out and "requeueing job" in out and "restart 1" in out, out[-4000:]
    assert_same_as_uninterrupted(whole, run)


def log_of(run: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run / "slurm").glob("*.out")))


def test_bad_submissions_fail_before_queueing(slurm_cluster, tmp_path):
    cfg = dp_recipe(tmp_path, mntp_steps=2)
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    r = embedforge("submit", "slurm", str(cfg), f"output_dir={tmp_path / 'x'}", "--partition", "no-such-partition")
    assert r.returncode == 2 and "SLURM refused the job" in r.stderr and "partition" in r.stderr.lower(), r.stderr
    r = embedforge("submit", "slurm", str(cfg), "stages.mntp.steps=-3", f"output_dir={tmp_path / 'x'}")
    assert r.returncode == 2 and "steps" in r.stderr, r.stderr
    r = embedforge("submit", "slurm", str(cfg), f"output_dir={tmp_path / 'x'}", "--job-name", "a;b")
    assert r.returncode == 2 and "--job-name" in r.stderr, r.stderr
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert after == before and not (tmp_path / "x").exists()


def test_injection_does_not_run_and_secrets_stay_out(slurm_cluster, tmp_path):
    cfg = dp_recipe(tmp_path, mntp_steps=2)
    pwned = tmp_path / "pwned"
    run = tmp_path / "inject"
    secret = "s3cr3t-token-value"
    evil = f"model.path=/nonexistent; touch {pwned}; echo $(touch {pwned})"
    s = embedforge("submit", "slurm", str(cfg), evil, f"output_dir={run}", "--tasks-per-node", "2",
                   "--job-name", "ef-test", env={"HF_TOKEN": secret, "WANDB_API_KEY": secret})
    assert s.returncode == 0, s.stderr
    job = s.stdout.split()[-1]
    wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), "the job to end")
    out = log_of(run)
    assert job_state(job) == "FAILED" and "/nonexistent; touch" in out, out[-3000:]  # the path, verbatim
    assert not pwned.exists()
    scripts = list((run / "slurm").glob("*.sbatch"))
    assert len(scripts) == 1 and secret not in scripts[0].read_text() and secret not in out


def test_eval_sweep_as_a_slurm_array(slurm_cluster, reference, tmp_path):
    """`eval sweep --slurm`: one array task per (checkpoint, task), then a report job after them;
    the report has every cell, and rerunning the sweep here computes nothing."""
    _, whole = reference
    out = tmp_path / "sweep"
    no_instructions = tmp_path / "instructions.json"  # the tiny model's max_length (48) is shorter than them
    no_instructions.write_text(json.dumps({"tasks": {"EmbedforgeRTSentiment": "", "EmbedforgeWordNetRetrieval": "",
                                                     "EmbedforgeWordNetSameSense": ""}}))
    tasks = ["--tasks", "EmbedforgeRTSentiment", "EmbedforgeWordNetRetrieval", "EmbedforgeWordNetSameSense"]
    r = embedforge("eval", "sweep", "--models", str(whole / "01-supervised" / "final"), "--checkpoints",
                   f"{whole}/00-mntp/step-*", "--output", str(out), "--instructions", str(no_instructions), *tasks,
                   "--slurm")
    assert r.returncode == 0 and "submitted array" in r.stdout, r.stderr[-3000:]
    array, report = r.stdout.split("submitted array ")[1].split()[0], r.stdout.split("report job ")[1].split(";")[0]
    wait_for(lambda: job_state(report) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), "the report job")
    logs = "\n".join(p.read_text() for p in sorted((out / "slurm").glob("*.out")))
    assert job_state(report) == "COMPLETED", logs[-4000:]
    assert len(list((out / "slurm").glob(f"ef-eval-sweep-{array}_*.out"))) == 9  # 3 models x 3 local tasks
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 9 and (out / "heatmap.png").is_file() and (out / "score_vs_step.png").is_file()
    again = embedforge("eval", "sweep", "--models", str(whole / "01-supervised" / "final"), "--checkpoints",
                       f"{whole}/00-mntp/step-*", "--output", str(out), "--instructions", str(no_instructions), *tasks)
    assert again.returncode == 0 and again.stderr.count("all cached") == 9, again.stderr[-3000:]
