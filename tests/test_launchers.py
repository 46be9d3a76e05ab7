"""Launchers without a cluster: the sbatch scripts `embedforge submit slurm` renders (every launch
mode is valid bash, values are checked or quoted), SLURM task identity -> torch.distributed env, the
wall-time backstop (EMBEDFORGE_DEADLINE) and the run's STOPPED marker, and `train --nproc`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from launchers.rank import slurm_rank_env
from launchers.slurm import SlurmJob, SubmitError, array_script, render
from tests.helpers import EMBEDFORGE, losses, run_config, run_embedforge
from toolkit.config import to_dict
from toolkit.errors import EmbedforgeError


def job(tmp_path: Path, **kw) -> SlurmJob:
    return SlurmJob(config=tmp_path / "recipe.yaml", output_dir=tmp_path / "run", **kw)


@pytest.mark.parametrize("launch", ["srun", "torchrun", "ray"])
def test_every_launch_mode_renders_valid_bash(tmp_path, launch):
    script = render(job(tmp_path, launch=launch, nodes=2, gpus_per_node=4, partition="gpu", time="1-00:00:00",
                        account="proj.a", overrides=["stages.mntp.steps=5", "model.path=/x; rm -rf ~"]))
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    signal = "B:TERM@120" if launch == "ray" else "TERM@120"  # ray: the batch shell relays it (STOP_REQUESTED)
    assert f"#SBATCH --signal={signal}\n" in script and "#SBATCH --requeue" in script and "USR1" not in script
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --partition=gpu" in script
    assert "'model.path=/x; rm -rf ~'" in script  # one quoted word, never code
    assert f"if [ -f {tmp_path}/run/STOPPED ]" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert script.index(f"rm -f {tmp_path}/run/STOPPED") < script.index("srun")  # a stale marker never requeues
    assert "--cpus-per-task=$SLURM_CPUS_PER_TASK" in script and "RAY_AUTH_MODE" not in script
    if launch == "srun":
        assert "#SBATCH --ntasks-per-node=4" in script and "-m launchers.rank train" in script
    elif launch == "torchrun":
        assert "#SBATCH --ntasks-per-node=1" in script and "--rdzv-backend=c10d" in script
        assert "--nproc-per-node=4" in script
    else:
        assert "start --head" in script and "-m cluster.ray_train" in script and "--workers=8" in script
        assert f"stop_request={tmp_path}/run/STOP_REQUESTED" in script and "' TERM" in script


def test_options_and_their_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "SECRET_VALUE")
    script = render(job(tmp_path, signal="USR2", signal_seconds=300, chain=3, requeue=False))
    assert "#SBATCH --signal=USR2@300" in script and "#SBATCH --dependency=singleton" in script
    assert "#SBATCH --no-requeue" in script and "--gpus-per-node" not in script
    assert "scontrol requeue" not in script  # a chain (or --no-requeue) never requeues itself
    chained = render(job(tmp_path, chain=2))
    assert "#SBATCH --no-requeue" in chained and "scontrol requeue" not in chained
    bad = [dict(job_name="x;reboot"), dict(partition="a b"), dict(time="tomorrow"), dict(nodes=0),
           dict(gpus_per_node=4, tasks_per_node=2), dict(chain=0)]
    for kw in bad:
        with pytest.raises(SubmitError):
            render(job(tmp_path, **kw))
    recipe = tmp_path / "tp.yaml"  # tp=4 cannot fit 2 nodes x 1 rank: refused before anything is queued
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "o"), "model": {"path": "x"}, "parallel": {"tp": 4},
                                      "engine": "megatron",
                                      "stages": [{"name": "s", "steps": 1, "data": {"path": "x"},
                                                  "objective": {"kind": "mntp"}}]}))
    r = subprocess.run([EMBEDFORGE, "submit", "slurm", str(recipe), "--nodes", "2", "--dry-run"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not divisible by tp(4)" in r.stderr, r.stderr
    with pytest.raises(SubmitError, match="log folder"):
        render(dataclasses.replace(job(tmp_path), output_dir=tmp_path / "has space"))
    assert "SECRET_VALUE" not in script  # nothing from the submitting environment is written


def test_slurm_task_identity_becomes_torch_env():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4",
           "MASTER_ADDR": "node1", "MASTER_PORT": "20001"}
    assert slurm_rank_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert slurm_rank_env({**env, "RANK": "0"}) == {}  # torchrun mode: torchrun set them
    with pytest.raises(EmbedforgeError, match="SLURM_PROCID"):
        slurm_rank_env({"MASTER_ADDR": "x"})


def write_recipe(tmp_path: Path, model_dir: Path, out: str) -> Path:
    cfg = to_dict(run_config(tmp_path, model_dir, out))
    cfg["stages"] = cfg["stages"][:2]
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_embedforge("train", *args, env=env)


def test_wall_time_backstop_saves_stops_and_resumes(tiny_llama_dir, tmp_path):
    """A deadline nearer than checkpoint.deadline_margin_s: save after the step, exit 3, leave STOPPED;
    the next run resumes and finishes as if never stopped, and removes the marker."""
    whole = write_recipe(tmp_path, tiny_llama_dir, "whole")
    sliced = write_recipe(tmp_path, tiny_llama_dir, "sliced")
    a = train(str(whole))
    assert a.returncode == 0, a.stderr[-3000:]
    soon = {"EMBEDFORGE_DEADLINE": str(int(time.time()) + 3600)}
    b = train(str(sliced), "checkpoint.deadline_margin_s=7200", env=soon)
    assert b.returncode == 3 and "before the job's time limit" in b.stderr, b.stderr[-3000:]
    marker = tmp_path / "sliced" / "STOPPED"
    assert json.loads(marker.read_text()) == {"stage": "mntp", "step": 1}
    assert (tmp_path / "sliced" / "00-mntp" / "step-1" / "COMPLETE").is_file()
    c = train(str(sliced))
    assert c.returncode == 0, c.stderr[-3000:]
    assert not marker.exists() and losses(tmp_path / "sliced") == losses(tmp_path / "whole")


@pytest.mark.slow
def test_nproc_runs_torchrun_and_resumes_at_another_world_size(tiny_llama_dir, tmp_path):
    """2 ranks stop with a checkpoint (exit 3 through torchrun); 1 rank resumes it: the hf engine's
    state is DP-independent and resampled data streams restart with fresh draws (said in the log;
    exact-epoch data refuses, naming why: tests/test_data_stream.py)."""
    cfg = write_recipe(tmp_path, tiny_llama_dir, "np")
    data = yaml.safe_load(cfg.read_text())
    for stage in data["stages"]:
        stage["data"]["mode"] = "resampled"
    cfg.write_text(yaml.safe_dump(data))
    r = train(str(cfg), "--nproc", "2", "--stop-after-steps", "2")
    assert r.returncode == 3 and "stopped at step 2" in r.stdout + r.stderr, r.stderr[-3000:]
    r = train(str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "saved at {'dp': 2" in r.stderr and "resampled streams restart" in r.stderr, r.stderr[-3000:]
    assert (tmp_path / "np" / "01-simcse" / "final" / "embedforge.json").is_file()


def test_sbatch_values_reject_a_trailing_newline(tmp_path):
    """`^...$` with re.match lets "name\\n" through: a second line in the #SBATCH header (issue 16)."""
    for kw in (dict(job_name="ok\n"), dict(partition="gpu\n"), dict(account="a\n"), dict(time="10:00\n")):
        with pytest.raises(SubmitError):
            render(job(tmp_path, **kw))
    with pytest.raises(SubmitError, match="log folder"):
        render(dataclasses.replace(job(tmp_path), output_dir=tmp_path / "run\n"))


def test_sweep_array_tasks_request_their_gpus_and_the_report_job_none(tmp_path):
    placement = ["#SBATCH --partition=gpu"]
    tasks = array_script("ef-eval-sweep", tmp_path, placement, "python -m launchers.cli eval sweep --job-index "
                         '"$SLURM_ARRAY_TASK_ID"', cpus=4, gpus=1, array="0-9%2")
    report = array_script("ef-eval-sweep", tmp_path, placement, "python -m launchers.cli eval sweep --report-only", cpus=4)
    for script in (tasks, report):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "#SBATCH --gpus-per-task=1\n" in tasks and "#SBATCH --array=0-9%2\n" in tasks
    assert "gpus" not in report and "--array" not in report and "#SBATCH --partition=gpu" in report


def test_sweep_at_tp_pp_runs_each_array_task_under_torchrun_and_refuses_ray(tmp_path, monkeypatch, capsys):
    """--tp / --pp: a SLURM array task runs its job's model-parallel group under torchrun (tp x pp
    processes, at least that many CPUs; the report job reads the cache in one process); Ray has no
    such group for a sweep job, so `--ray` with them is refused in one line."""
    import launchers.slurm
    from launchers.cli import main

    model = tmp_path / "enc"
    model.mkdir()
    (model / "embedforge.json").write_text("{}")
    # no controller here (tests/test_slurm_cluster.py submits sweeps to a real one): the scripts are the subject
    monkeypatch.setattr(launchers.slurm, "check", lambda name, script: None)
    monkeypatch.setattr(launchers.slurm, "_sbatch", lambda path, *options: "41" if "array" in path.name else "42")
    common = ["eval", "sweep", "--models", str(model), "--tasks", "EmbedforgeWordNetSameSense",
              "--output", str(tmp_path / "out")]
    assert main([*common, "--slurm", "--tp", "2", "--pp", "2", "--gpus-per-job", "4"]) == 0
    tasks = (tmp_path / "out" / "slurm" / "ef-eval-sweep-array.sbatch").read_text()
    report = (tmp_path / "out" / "slurm" / "ef-eval-sweep-report.sbatch").read_text()
    assert "-m torch.distributed.run --standalone --nproc-per-node=4 -m launchers.cli eval sweep" in tasks
    assert "--tp 2 --pp 2 --job-index \"$SLURM_ARRAY_TASK_ID\"" in tasks and "#SBATCH --gpus-per-task=4" in tasks
    assert "#SBATCH --cpus-per-task=4" in tasks
    assert "torch.distributed.run" not in report and "--tp" not in report and "--report-only" in report
    assert main([*common, "--slurm", "--tp", "2", "--gpus-per-job", "1"]) == 2
    assert "--gpus-per-job 1 < --tp 2 x --pp 1" in capsys.readouterr().err
    assert main([*common, "--ray", "local", "--tp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval sweep --ray with --tp 2 / --pp 1: a job's model-parallel group runs under torchrun" in err
    assert "\n" not in err
