"""`embedforge submit slurm`: a recipe as an sbatch script that survives preemption and time limits.

Launch modes (`--launch`):
- `srun` (default): one task per rank (per GPU, or `--tasks-per-node` ranks on CPU nodes); every rank
  is a SLURM task and gets the scheduler's signals itself, so a save may take up to KillWait.
- `torchrun`: one task per node running torchrun with a c10d rendezvous on the first node. torchrun
  forwards SIGTERM to its ranks but kills them 30 s later: saves must fit in 30 s.
- `ray` (Ray on SLURM): a Ray head on the first node, workers on the others, and the Ray driver
  (`cluster.ray_train`) running the recipe on a worker group over the allocation.

Preemption: `--signal=TERM@120` (or USR2; never USR1, which some sites use for their own purposes)
reaches every rank; the ranks agree at the next step boundary, save, and the run writes
`<output_dir>/STOPPED`; the script then requeues the job (`--requeue`), which resumes from the newest
complete checkpoint. A scheduler preemption or `scontrol requeue` kills and requeues the job itself
after KillWait; the ranks save on its SIGTERM the same way (not under `--launch ray`: that SIGTERM
reaches the Ray processes too, which stop at once, so the requeued job resumes from the newest
periodic checkpoint). The job's end time becomes
EMBEDFORGE_DEADLINE: the run's wall-time backstop. `--chain K` queues K jobs of one name with
`--dependency=singleton`, each taking over where the previous one stopped.

Safety: values in `#SBATCH` lines must match a strict pattern (sbatch does not parse shell quotes
there); everything in the script body is shlex-quoted. Nothing from the environment is written into
the script: secrets stay in the environment that sbatch exports at submission.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from launchers.cli_format import examples
from launchers.intermixed import take_overrides_anywhere
from toolkit.errors import EmbedforgeError

# Checked with fullmatch: `$` also matches before a trailing newline, which would start a new #SBATCH line.
SAFE = re.compile(r"[A-Za-z0-9/_.][A-Za-z0-9._,:+=@/-]*")  # what an #SBATCH value may contain
TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}|\d+-\d+")  # SLURM's time formats


class SubmitError(EmbedforgeError, ValueError):
    """A submission that must not reach the queue (bad option, unknown partition, bad config)."""


@dataclass
class SlurmJob:
    config: Path
    output_dir: Path  # the recipe's output_dir (after overrides): logs, the STOPPED marker
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0  # ranks per node; default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int = 1
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "embedforge"
    launch: Literal["srun", "torchrun", "ray"] = "srun"
    signal: Literal["TERM", "USR2"] = "TERM"
    signal_seconds: int = 120
    requeue: bool = True
    chain: int = 1
    max_failures: int = 3  # Ray mode: worker-group restarts
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    def validate(self) -> None:
        if self.nodes < 1 or self.ranks_per_node < 1 or self.cpus_per_task < 1 or self.gpus_per_node < 0:
            raise SubmitError("--nodes, --tasks-per-node and --cpus-per-task must be >= 1, --gpus-per-node >= 0")
        if self.gpus_per_node and self.tasks_per_node and self.tasks_per_node != self.gpus_per_node:
            raise SubmitError(f"--tasks-per-node={self.tasks_per_node} with --gpus-per-node={self.gpus_per_node}: "
                              "one rank per GPU (leave --tasks-per-node out)")
        if self.chain < 1 or self.signal_seconds < 1:
            raise SubmitError("--chain and --signal-seconds must be >= 1")
        check_sbatch_values(job_name=self.job_name, partition=self.partition, account=self.account,
                            time=self.time, log_dir=self.log_dir)

    @property
    def log_dir(self) -> Path:
        return self.output_dir / "slurm"


def check_sbatch_values(*, job_name: str, partition: str | None, account: str | None, time: str | None,
                        log_dir: Path) -> None:
    """Values that go into `#SBATCH` lines, where sbatch parses no shell quotes: a strict pattern."""
    for flag, value in (("job-name", job_name), ("partition", partition), ("account", account)):
        if value is not None and not SAFE.fullmatch(value):
            raise SubmitError(f"--{flag}={value!r}: only letters, digits and ._,:+=@/- are allowed")
    if time is not None and not TIME.fullmatch(time):
        raise SubmitError(f"--time={time!r}: use MM, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    if not SAFE.fullmatch(str(log_dir)):
        raise SubmitError(f"{log_dir}: the log folder (from output_dir) must not contain spaces or "
                          "shell characters (it goes into an #SBATCH line)")


def _placement(partition: str | None, time: str | None, account: str | None) -> list[str]:
    return [f"#SBATCH --{opt}={v}" for opt, v in (("partition", partition), ("time", time), ("account", account)) if v]


def render(job: SlurmJob) -> str:
    """The sbatch script for `job` (validated first)."""
    from toolkit.run_layout import STOP_REQUEST, STOPPED

    job.validate()
    q = shlex.quote
    per_node = job.ranks_per_node
    one_task_per_node = job.launch in ("torchrun", "ray")
    lines = ["#!/bin/bash", "# Written by `embedforge submit slurm`; edit the recipe, not this file.",
             f"#SBATCH --job-name={job.job_name}", f"#SBATCH --nodes={job.nodes}"]
    if one_task_per_node:
        lines += ["#SBATCH --ntasks-per-node=1", f"#SBATCH --cpus-per-task={job.cpus_per_task * per_node}"]
    else:
        lines += [f"#SBATCH --ntasks-per-node={per_node}", f"#SBATCH --cpus-per-task={job.cpus_per_task}"]
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    lines += _placement(job.partition, job.time, job.account)
    # Ray mode: the notice goes to the batch shell only (the Ray processes must live on while the
    # actors save), which relays it to the run as <output_dir>/STOP_REQUESTED.
    batch_only = "B:" if job.launch == "ray" else ""
    lines += [f"#SBATCH --signal={batch_only}{job.signal}@{job.signal_seconds}", f"#SBATCH --output={job.log_dir}/%x-%j.out",
              "#SBATCH --open-mode=append"]
    lines.append("#SBATCH --requeue" if job.requeue and job.chain == 1 else "#SBATCH --no-requeue")
    if job.chain > 1:
        lines.append("#SBATCH --dependency=singleton")
    threads = job.cpus_per_task
    lines += [
        "set -uo pipefail",
        f"cd {q(str(job.workdir))}",
        f"export OMP_NUM_THREADS={threads} TOKENIZERS_PARALLELISM=false",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # a dead peer fails fast",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        '# the wall-time backstop: the run saves and stops before the job\'s end time',
        'end=$(squeue -h -j "$SLURM_JOB_ID" -o %e)',
        'if deadline=$(date -d "$end" +%s 2>/dev/null); then export EMBEDFORGE_DEADLINE=$deadline; fi',
        'echo "[embedforge] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST;'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT; ends ${end:-?}"',
    ]
    marker = q(str(job.output_dir / STOPPED))
    lines.append(f"rm -f {marker}  # only this run's stop may requeue it (not a stale one, nor a crash)")
    train = " ".join(q(a) for a in ["train", str(job.config), *job.overrides])
    python = q(job.python)
    cpus = "--cpus-per-task=$SLURM_CPUS_PER_TASK"  # srun does not inherit it on every SLURM version
    if job.launch == "srun":
        lines.append(f"srun --kill-on-bad-exit=1 {cpus} {python} -m launchers.rank {train}")
    elif job.launch == "torchrun":
        lines.append(f"srun --kill-on-bad-exit=1 {cpus} {python} -m torch.distributed.run --nnodes=$SLURM_JOB_NUM_NODES "
                     f"--nproc-per-node={per_node} --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT "
                     f"--rdzv-id=$SLURM_JOB_ID --max-restarts=0 -m launchers.rank {train}")
    else:
        lines += _ray_body(job, python, q(str(job.output_dir / STOP_REQUEST)), cpus)
    lines.append("rc=$?")
    if job.requeue and job.chain == 1:  # a chain continues with its next job instead
        lines += [f"if [ -f {marker} ]; then",
                  '  echo "[embedforge] stopped with a checkpoint; requeueing job $SLURM_JOB_ID"',
                  '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
                  "fi"]
    lines.append("exit $rc")
    return "\n".join(lines) + "\n"


def _ray_body(job: SlurmJob, python: str, stop_request: str, srun_cpus: str) -> list[str]:
    """Ray on SLURM: head on the first node, one worker per other node, the driver in the batch step;
    a preemption notice to the batch shell becomes the run's STOP_REQUESTED file."""
    q = shlex.quote
    ray = q(str(Path(job.python).parent / "ray"))
    cpus, gpus = job.cpus_per_task * job.ranks_per_node, job.gpus_per_node
    resources = f"--num-cpus={cpus} --num-gpus={gpus}"
    driver = " ".join(q(a) for a in [str(job.config), *job.overrides])
    return [
        'head_ip=$(getent ahostsv4 "$MASTER_ADDR" | awk \'NR==1 {print $1}\')',
        "ray_port=$((6379 + SLURM_JOB_ID % 1000))",
        f'srun --nodes=1 --ntasks=1 {srun_cpus} -w "$MASTER_ADDR" {ray} start --head --node-ip-address="$head_ip" '
        f'--port=$ray_port {resources} --include-dashboard=false --disable-usage-stats --block &',
        f'for _ in $(seq 120); do {ray} status --address="$head_ip:$ray_port" >/dev/null 2>&1 && break; sleep 1; done',
        'if [ "$SLURM_JOB_NUM_NODES" -gt 1 ]; then',
        f'  srun --nodes=$((SLURM_JOB_NUM_NODES - 1)) --ntasks=$((SLURM_JOB_NUM_NODES - 1)) {srun_cpus} --exclude="$MASTER_ADDR" '
        f'{ray} start --address="$head_ip:$ray_port" {resources} --disable-usage-stats --block &',
        "fi",
        f'RAY_ADDRESS="$head_ip:$ray_port" {python} -m cluster.ray_train {driver} '
        f"--workers={job.nodes * job.ranks_per_node} --cpus-per-worker={job.cpus_per_task} "
        f"--gpus-per-worker={1 if gpus else 0} --max-failures={job.max_failures} &",
        "driver=$!",
        f"stop_request={stop_request}",
        "trap 'echo \"[embedforge] preemption notice: asking the run to save and stop\"; touch \"$stop_request\"' "
        f"{job.signal}",
        'while kill -0 "$driver" 2>/dev/null; do wait "$driver"; rc=$?; done',
        "kill $(jobs -p) 2>/dev/null  # the ray start --block steps: their Ray processes go with them",
        "(exit $rc)",
    ]


def check(name: str, script: str) -> None:
    """Ask the controller whether the job could run (`sbatch --test-only`): an unknown partition or
    account, or resources no node has, fail here instead of after queueing."""
    try:
        r = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SubmitError("sbatch not found: run on a SLURM login node (or start cluster/slurm/local_cluster.sh)") from None
    if r.returncode != 0:
        raise SubmitError(f"SLURM refused the job ({name}): {r.stderr.strip() or r.stdout.strip()}")


def submit(job: SlurmJob) -> list[str]:
    """Render, check, keep the script beside the logs, queue it (`chain` times); returns job ids."""
    script = render(job)
    check(job.job_name, script)
    job.log_dir.mkdir(parents=True, exist_ok=True)
    path = job.log_dir / f"{job.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    return [_sbatch(path) for _ in range(job.chain)]


def submit_array(*, name: str, n_tasks: int, task_command: list[str], report_command: list[str], log_dir: Path,
                 cpus: int = 1, gpus: int = 0, partition: str | None = None, time: str | None = None,
                 account: str | None = None, max_parallel: int = 0) -> tuple[str, str]:
    """A job array whose task i runs `task_command i` (with `gpus` GPUs each), and a report job after
    all of them ended (`afterany`: a failed task leaves a gap in the report, not a report that never comes)."""
    check_sbatch_values(job_name=name, partition=partition, account=account, time=time, log_dir=log_dir)
    if n_tasks < 1:
        raise SubmitError("the sweep has no jobs")
    placement = _placement(partition, time, account)
    array = f"0-{n_tasks - 1}" + (f"%{max_parallel}" if max_parallel else "")
    tasks = array_script(name, log_dir, placement, " ".join(shlex.quote(a) for a in task_command) +
                         ' "$SLURM_ARRAY_TASK_ID"', cpus=cpus, gpus=gpus, array=array)
    report = array_script(name, log_dir, placement, " ".join(shlex.quote(a) for a in report_command), cpus=cpus)
    check(name, tasks)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"{name}-array.sbatch").write_text(tasks)
    (log_dir / f"{name}-report.sbatch").write_text(report)
    array_id = _sbatch(log_dir / f"{name}-array.sbatch")
    return array_id, _sbatch(log_dir / f"{name}-report.sbatch", f"--dependency=afterany:{array_id}")


def array_script(name: str, log_dir: Path, placement: list[str], command: str, *, cpus: int, gpus: int = 0,
                 array: str | None = None) -> str:
    """One sweep script: an array (`array` = its index range) or the report job."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={cpus}",
             f"#SBATCH --output={log_dir}/%x-%A_%a.out" if array else f"#SBATCH --output={log_dir}/%x-report-%j.out"]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-task={gpus}")
    lines += placement
    if array:
        lines.append(f"#SBATCH --array={array}")
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}",
              f"export OMP_NUM_THREADS={cpus} TOKENIZERS_PARALLELISM=false", command]
    return "\n".join(lines) + "\n"


def _sbatch(path: Path, *options: str) -> str:
    r = subprocess.run(["sbatch", "--parsable", *options, str(path)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise SubmitError(f"sbatch {path}: {r.stderr.strip()}")
    return r.stdout.strip().split(";")[0]


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("slurm", help="submit a recipe as a requeueable SLURM batch job",
                              description="Render an sbatch script for a recipe, check it with the controller, "
                                          "and queue it (or print it with --dry-run).",
                              epilog=examples("embedforge submit slurm configs/scale/llama3-8b.yaml "
                                              "output_dir=/shared/runs/l8b --nodes 2 --gpus-per-node 8 --time 04:00:00",
                                              "embedforge submit slurm configs/quickstart.yaml --tasks-per-node 2 "
                                              "--chain 3 --dry-run",
                                              "embedforge submit slurm configs/quickstart.yaml --launch ray --nodes 2"))
    s.add_argument("config", help="YAML recipe")
    s.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    s.add_argument("--nodes", type=int, default=1, help="nodes of the allocation")
    s.add_argument("--gpus-per-node", type=int, default=0, help="one rank per GPU")
    s.add_argument("--tasks-per-node", type=int, default=0, help="ranks per node without GPUs (0: 1)")
    s.add_argument("--cpus-per-task", type=int, default=1, help="CPUs per rank")
    s.add_argument("--partition", default=None, help="SLURM partition")
    s.add_argument("--time", default=None, help="wall-time limit, e.g. 04:00:00 or 2-00:00:00")
    s.add_argument("--account", default=None, help="SLURM account")
    s.add_argument("--job-name", default="embedforge", help="the job's name (every job of a --chain shares it)")
    s.add_argument("--launch", choices=["srun", "torchrun", "ray"], default="srun",
                   help="srun: a task per rank; torchrun: a task per node; ray: a Ray cluster over the allocation")
    s.add_argument("--signal", choices=["TERM", "USR2"], default="TERM", help="preemption notice sent to the ranks")
    s.add_argument("--signal-seconds", type=int, default=120, help="how long before the time limit it is sent")
    s.add_argument("--no-requeue", action="store_true", help="do not requeue after a preemption stop")
    s.add_argument("--chain", type=int, default=1, help="queue N jobs of one name that run one after another")
    s.add_argument("--max-failures", type=int, default=3, help="--launch ray: worker-group restarts")
    s.add_argument("--dry-run", action="store_true", help="print the script, queue nothing")
    s.set_defaults(func=run)
    return take_overrides_anywhere(s)


def run(args: argparse.Namespace) -> int:
    from launchers.ray_submit import check_no_secrets
    from toolkit.config import load_config
    from toolkit.distributed.parallel_dims import ParallelDims
    from toolkit.train import preflight

    config = Path(args.config).resolve()
    cfg = load_config(config, args.overrides)  # a bad recipe fails here, before anything is queued
    preflight(cfg, check_data=False)  # so does one its engine refuses (data paths are the cluster's)
    job = SlurmJob(config=config, output_dir=Path(cfg.output_dir).resolve(), overrides=list(args.overrides),
                   nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                   cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                   account=args.account, job_name=args.job_name, launch=args.launch, signal=args.signal,
                   signal_seconds=args.signal_seconds, requeue=not args.no_requeue, chain=args.chain,
                   max_failures=args.max_failures)
    check_no_secrets(" ".join(args.overrides), os.environ)  # the script is written to disk
    ParallelDims.from_config(cfg.parallel, job.nodes * job.ranks_per_node, 0)  # the layout fits the ranks
    if args.dry_run:
        print(render(job), end="")
        return 0
    ids = submit(job)
    print(" ".join(ids))
    return 0
