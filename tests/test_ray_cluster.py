"""Training on a real local Ray cluster (`ray start --head` on loopback, the .venv's interpreter).

A worker group injects torchrun's variables and strips the ones of launchers around the cluster; a
2-worker run equals the same recipe under torchrun; a worker SIGKILLed mid-run makes the group
restart from the newest complete checkpoint and the run still equals the uninterrupted one (losses
and final weights within 1e-6; on CPU with the same layout they are in fact bit-identical); a
preemption signal stops the run with a checkpoint without a retry; `embedforge submit ray` runs a
recipe as a Ray job, refuses a bad config before submitting, and never lets an override reach a shell.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.helpers import EMBEDFORGE, free_port, losses, torchrun, two_stage_recipe
from toolkit.fault_injection import TEST_HOLD_ENV

# a local Ray cluster's start plus the 2-rank torchrun reference run, then the test's own runs
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
VENV_BIN = Path(sys.executable).parent
TOL = 1e-6  # losses and weights; exact resume on CPU gives bit-identical values
# What a Ray cluster started inside a SLURM / MPI / torchrun job inherits; no actor may see it.
LAUNCHER_ENV = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "1", "SLURMD_NODENAME": "n1", "PMI_RANK": "1",
                "OMPI_COMM_WORLD_RANK": "1", "TORCHELASTIC_RUN_ID": "stale", "GROUP_RANK": "3", "RANK": "5",
                "WORLD_SIZE": "8", "MASTER_PORT": "1"}


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node cluster (4 CPUs) in its own session, so teardown ends exactly its processes: `ray
    stop` would end every Ray cluster on the machine, other test runs' included."""
    import ray
    from ray.job_submission import JobSubmissionClient

    tmp = Path(tempfile.mkdtemp(prefix="ef-ray-"))  # short: Ray's socket paths must stay < 108 chars
    gcs, dashboard, client_port, agent_port = (free_port() for _ in range(4))
    env = {**os.environ, **LAUNCHER_ENV, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client_port}",
           f"--dashboard-agent-listen-port={agent_port}", "--num-cpus=4", "--disable-usage-stats",
           f"--temp-dir={tmp}"]
    log = open(tmp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp / "ray-start.log").read_text()[-3000:]
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        ray.init(address=f"127.0.0.1:{gcs}", log_to_driver=False)
        yield SimpleNamespace(dashboard=url, temp_dir=tmp, jobs=JobSubmissionClient(url))
    finally:
        ray.shutdown()
        proc.send_signal(signal.SIGTERM)  # --block: ray start drains the node and ends what it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        deadline = time.monotonic() + 20
        while (left := _session_pids(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # stragglers of this cluster only (same session id), by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes outlived `ray start --block`: {left}"


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    """The 2-stage tiny recipe (full MNTP, then LoRA supervised) on the hf engine, DP=2, checkpoints
    every 2 steps, 6 MNTP steps. A test that kills or signals a rank after the step-2 checkpoint holds
    that rank there (TEST_HOLD_ENV): the tiny run's steps take ~40 ms, a watcher can be seconds late."""
    tmp = tmp_path_factory.mktemp("recipe")
    path = two_stage_recipe(tmp)
    cfg = yaml.safe_load(path.read_text())
    cfg["engine"] = "hf"
    cfg["stages"][0]["steps"] = 6
    for stage in cfg["stages"]:  # one shard per dataset: 2 ranks need resampled streams
        stage["data"]["mode"] = "resampled"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def reference(tiny_recipe, tmp_path_factory) -> Path:
    """The uninterrupted run under torchrun (2 ranks)."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    r = torchrun("train", str(tiny_recipe), f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def assert_same_run(got: Path, want: Path) -> None:
    from safetensors.torch import load_file

    a, b = losses(got), losses(want)
    assert a.keys() == b.keys() and len(a) == 9, (sorted(a), sorted(b))
    for key in b:
        assert abs(a[key] - b[key]) <= TOL, (key, a[key], b[key])
    for stage in ("00-mntp", "01-supervised"):
        x, y = (load_file(str(run / stage / "final" / "model.safetensors")) for run in (got, want))
        assert x.keys() == y.keys()
        worst = max(float((x[k] - y[k]).abs().max()) for k in x)
        assert worst <= TOL, (stage, worst)


def kill_when(path: Path, pid: int, sig: int, fired: list, timeout: float = 300.0) -> threading.Thread:
    """Send `sig` to `pid` as soon as `path` exists (a checkpoint's COMPLETE marker). The run must hold
    that rank there (TEST_HOLD_ENV): this thread may be seconds late, and the tiny run would be over."""

    def watch() -> None:
        end = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > end:
                return
            time.sleep(0.01)
        os.kill(pid, sig)
        fired.append(pid)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def worker_logs(cluster) -> str:
    logs = cluster.temp_dir / "session_latest" / "logs"
    return "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err"))


def test_worker_group_injects_rank_env_and_initialises_gloo(ray_cluster, monkeypatch, tmp_path):
    from cluster.ray_group import GroupSpec, WorkerGroup

    def probe():  # nested: pickled by value (the actors cannot import this test module)
        """Runs inside each actor: what torch.distributed and the environment look like there."""
        import torch
        import torch.distributed as dist

        from toolkit.distributed.parallel_dims import init_distributed

        rank, world = init_distributed()
        t = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
        dist.all_reduce(t)
        gathered = [None] * world
        dist.all_gather_object(gathered, os.getpid())
        return {"env": dict(os.environ), "sum": t.tolist(), "backend": dist.get_backend(), "pids": gathered,
                "threads": torch.get_num_threads(), "cwd": os.getcwd()}

    monkeypatch.setenv("SLURM_JOB_ID", "99")  # the driver's launcher variables do not travel either
    group = WorkerGroup(GroupSpec(workers=2, cpus_per_worker=1, workdir=str(tmp_path))).start()
    try:
        assert [w.rank for w in group.workers] == [0, 1]
        results = group.execute(probe)
    finally:
        group.shutdown()
    ports = set()
    for rank, r in enumerate(results):
        env = r["env"]
        assert env["RANK"] == str(rank) and env["LOCAL_RANK"] == str(rank)  # one node: local == global
        assert env["WORLD_SIZE"] == "2" and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == group.workers[0].node_ip and env["MASTER_PORT"] != "1"
        ports.add(env["MASTER_PORT"])
        stale = [k for k in env if k.startswith(("SLURM", "PMI_", "OMPI_", "TORCHELASTIC_")) or k == "GROUP_RANK"]
        assert not stale, stale
        assert env["OMP_NUM_THREADS"] == "1" and r["threads"] == 1
        assert r["cwd"] == str(tmp_path)
        assert r["backend"] == "gloo" and r["sum"] == [3.0, 30.0]
        assert r["pids"] == [w.pid for w in group.workers]
    assert len(ports) == 1
    deadline = time.monotonic() + 30  # shutdown ends the actors' processes
    while any(Path(f"/proc/{w.pid}").exists() for w in group.workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{w.pid}").exists() for w in group.workers)


def test_two_worker_run_equals_torchrun(ray_cluster, tiny_recipe, reference, tmp_path):
    from cluster.ray_group import run_training

    out = tmp_path / "run"
    report = run_training(tiny_recipe, [f"output_dir={out}"], workers=2, max_failures=0)
    assert report.completed and report.failures == []
    assert [s["final_dir"] for s in report.stages] == [str(out / "00-mntp" / "final"), str(out / "01-supervised" / "final")]
    assert_same_run(out, reference)


def test_killed_worker_restarts_from_the_newest_checkpoint(ray_cluster, tiny_recipe, reference, tmp_path):
    from cluster.ray_group import run_training

    out, fired, pids = tmp_path / "run", [], {}

    def on_start(group, attempt):
        pids[attempt] = [w.pid for w in group.workers]
        if attempt == 1:  # SIGKILL rank 1 right after the first checkpoint is committed
            kill_when(out / "00-mntp" / "step-2" / "COMPLETE", group.workers[1].pid, signal.SIGKILL, fired)

    report = run_training(tiny_recipe, [f"output_dir={out}"], workers=2, max_failures=1, on_start=on_start,
                          env={TEST_HOLD_ENV: "1:mntp:2"})
    assert fired == [pids[1][1]], "the kill did not happen"
    assert report.completed and len(report.failures) == 1, report
    assert "rank 1: ActorDiedError" in report.failures[0]
    assert set(pids[2]).isdisjoint(pids[1])  # a fresh group
    assert f"stage mntp: resumed from {out}/00-mntp/step-2 (step 2)" in worker_logs(ray_cluster)  # held there
    assert_same_run(out, reference)


def test_exhausted_restarts_raise_a_clear_error(ray_cluster, tiny_recipe, tmp_path):
    from cluster.ray_group import TrainingFailed, run_training

    out, fired = tmp_path / "killed", []

    def on_start(group, attempt):
        kill_when(out / "00-mntp" / "step-2" / "COMPLETE", group.workers[1].pid, signal.SIGKILL, fired)

    with pytest.raises(TrainingFailed) as err:
        run_training(tiny_recipe, [f"output_dir={out}"], workers=2, max_failures=0, on_start=on_start,
                     env={TEST_HOLD_ENV: "1:mntp:2"})
    assert fired and "training failed 1 time(s) (max_failures=0)" in str(err.value)
    assert "attempt 1: rank 1: ActorDiedError" in str(err.value)

    missing = tmp_path / "no-such-model"  # every rank raises: a restart would too, so none is tried
    with pytest.raises(TrainingFailed) as err:
        run_training(tiny_recipe, [f"output_dir={tmp_path / 'bad'}", f"model.path={missing}"], workers=2,
                     max_failures=3)
    assert len(err.value.failures) == 1 and "not retried: no process died" in str(err.value)
    assert "rank 0:" in err.value.failures[0] and "no-such-model" in err.value.failures[0], err.value.failures


@pytest.mark.parametrize("fail_at,last_step", [("1:mntp:3", 3), ("1:mntp:end", 6)])
def test_a_rank_that_raises_ends_the_run_promptly(ray_cluster, tiny_recipe, tmp_path, fail_at, last_step):
    """Rank 1 raises (the test hook EMBEDFORGE_TEST_FAIL_AT) in a step or at the stage's end while rank 0
    waits in a collective: the driver kills the group and reports it within seconds, not after the
    collective's 30-minute timeout, and does not retry (a raise is no lost process)."""
    from cluster.ray_group import TrainingFailed, run_training

    out, seen = tmp_path / "run", []

    def watch() -> None:  # rank 0 logs the step, then waits for rank 1 in the next collective
        end = time.monotonic() + 300
        while time.monotonic() < end and not seen:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and f'"step": {last_step},' in metrics.read_text():
                seen.append(time.monotonic())
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    with pytest.raises(TrainingFailed) as err:
        run_training(tiny_recipe, [f"output_dir={out}"], workers=2, max_failures=3,
                     env={"EMBEDFORGE_TEST_FAIL_AT": fail_at})
    seconds = time.monotonic() - seen[0]
    assert len(err.value.failures) == 1 and "not retried" in str(err.value), str(err.value)
    assert "rank 1: RuntimeError" in err.value.failures[0] and "injected failure" in err.value.failures[0]
    assert seconds < 60, seconds
    print(f"{fail_at}: reported {seconds:.1f} s after the failure")


def test_preemption_signal_stops_with_a_checkpoint_without_retrying(ray_cluster, tiny_recipe, reference, tmp_path):
    from cluster.ray_group import run_training

    out, fired, starts = tmp_path / "run", [], []

    def on_start(group, attempt):
        starts.append(attempt)
        kill_when(out / "00-mntp" / "step-2" / "COMPLETE", group.workers[0].pid, signal.SIGTERM, fired)

    report = run_training(tiny_recipe, [f"output_dir={out}"], workers=2, max_failures=3, on_start=on_start,
                          env={TEST_HOLD_ENV: "0:mntp:2"})
    assert fired and starts == [1] and report.failures == []
    assert not report.completed and report.stopped_at["stage"] == "mntp" and report.stopped_at["final_dir"] is None
    stopped_step = report.stopped_at["steps_done"]
    assert (out / "00-mntp" / f"step-{stopped_step}" / "COMPLETE").is_file() and (out / "STOPPED").is_file()

    again = run_training(tiny_recipe, [f"output_dir={out}"], workers=2, max_failures=0)  # "resubmitted"
    assert again.completed and not (out / "STOPPED").exists()
    assert_same_run(out, reference)


def test_submit_ray_job_end_to_end(ray_cluster, tiny_recipe, reference, tmp_path):
    secret = "hf_NOT_A_REAL_TOKEN_4711"
    env = {**os.environ, "HF_TOKEN": secret, "RAY_AUTH_MODE": "disabled"}
    # Shell syntax in an override must stay data: the run's output_dir is the literal string.
    markers = [tmp_path / f"injected-{i}" for i in range(3)]
    out = Path(f"{tmp_path}/run $(touch {markers[0]}); touch {markers[1]} `touch {markers[2]}`")
    base = [EMBEDFORGE, "submit", "ray", str(tiny_recipe)]
    opts = ["--address", ray_cluster.dashboard, "--workers", "2", "--max-failures", "1", "--workdir", str(tmp_path)]
    jobs_before = len(ray_cluster.jobs.list_jobs())

    bad = subprocess.run([*base, "stages.mntp.steps=many", *opts], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert bad.returncode == 2 and "stages" in bad.stderr and "steps" in bad.stderr, bad.stderr[-2000:]
    layout = subprocess.run([*base, "parallel.dp=4", *opts], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert layout.returncode == 2 and "world size 2" in layout.stderr, layout.stderr[-2000:]
    leak = subprocess.run([*base, f"output_dir={tmp_path / secret}", *opts], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert leak.returncode == 2 and "$HF_TOKEN" in leak.stderr, leak.stderr[-2000:]
    assert len(ray_cluster.jobs.list_jobs()) == jobs_before  # nothing reached the cluster

    r = subprocess.run([*base, f"output_dir={out}", *opts], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    job_id = r.stdout.split("submitted Ray job ", 1)[1].split()[0]
    assert f"Ray job {job_id}: SUCCEEDED" in r.stdout
    info = ray_cluster.jobs.get_job_info(job_id)
    assert str(info.status).endswith("SUCCEEDED") and "cluster.ray_train" in info.entrypoint
    assert (out / "01-supervised" / "final" / "embedforge.json").is_file()
    assert not any(m.exists() for m in markers)  # nothing ran in a shell
    for text in (r.stdout, r.stderr, info.entrypoint, str(info.metadata), ray_cluster.jobs.get_job_logs(job_id)):
        assert secret not in text
    assert_same_run(out, reference)


def test_ranks_are_contiguous_per_node_and_see_their_own_gpu():
    """Rank / LOCAL_RANK / CUDA_VISIBLE_DEVICES for 4 one-GPU actors on 2 nodes, bundles interleaved
    (no cluster needed: the assignment is a pure function of where the actors landed)."""
    from cluster.ray_group import WorkerInfo, assign_ranks, rank_env

    landed = [WorkerInfo(0, "node-a", "10.0.0.1", 100, ("3",)), WorkerInfo(1, "node-b", "10.0.0.2", 200, ("0",)),
              WorkerInfo(2, "node-a", "10.0.0.1", 101, ("1",)), WorkerInfo(3, "node-b", "10.0.0.2", 201, ("5",))]
    ranked = assign_ranks(landed)
    assert [(w.bundle, w.rank, w.local_rank) for w in ranked] == [(2, 0, 0), (0, 1, 1), (1, 2, 0), (3, 3, 1)]
    envs = rank_env(ranked, 29500)
    assert {e["MASTER_ADDR"] for e in envs} == {"10.0.0.1"} and {e["MASTER_PORT"] for e in envs} == {"29500"}
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["1,3", "1,3", "0,5", "0,5"]
    for w, e in zip(ranked, envs):  # cuda:LOCAL_RANK is the actor's own GPU
        assert e["CUDA_VISIBLE_DEVICES"].split(",")[int(e["LOCAL_RANK"])] == w.gpu_ids[0]
        assert e["WORLD_SIZE"] == "4" and e["LOCAL_WORLD_SIZE"] == "2"
    cpu = rank_env(assign_ranks([WorkerInfo(0, "n", "1.2.3.4", 1), WorkerInfo(1, "n", "1.2.3.4", 2)]), 1234)
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in cpu)
