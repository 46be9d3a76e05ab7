"""`embedforge submit ray`: a recipe as a Ray job (the Job API of the cluster's dashboard).

The job's entrypoint is the driver `python -m cluster.ray_train CONFIG [overrides] --workers N ...`,
which trains on a worker group and restarts it from the newest complete checkpoint when a worker
dies. The recipe is validated here first, so a bad config never reaches the cluster.

Paths: the config, output_dir and the overrides resolve against `--workdir` (default: this directory)
on the cluster, the recipe's own relative paths (model, data, prompt file) against the recipe's folder
there, so the cluster must see the same filesystem (as with SLURM).

Safety: the entrypoint is a shell command; every argument is shlex-quoted, so an override is only
ever an argument. Nothing from the environment is put in the job (entrypoint, runtime_env,
metadata are stored and shown by the dashboard): secrets such as HF_TOKEN must be set on the
cluster's nodes. An argument that contains the value of a secret-looking variable here is refused.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence

from launchers.cli_format import examples
from launchers.intermixed import take_overrides_anywhere
from toolkit.errors import EmbedforgeError

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(EmbedforgeError, ValueError):
    """A submission that must not reach the cluster (bad option, bad config, a secret in it)."""


def entrypoint(config: str, overrides: Sequence[str], *, workers: int, cpus_per_worker: float = 1.0,
               gpus_per_worker: int = 0, max_failures: int = 3, strategy: str = "PACK", workdir: str,
               python: str = "python") -> str:
    """The job's shell command, every argument quoted (an override is data, never shell syntax)."""
    args = [python, "-m", "cluster.ray_train", config, *overrides, f"--workers={workers}",
            f"--cpus-per-worker={cpus_per_worker:g}", f"--gpus-per-worker={gpus_per_worker}",
            f"--max-failures={max_failures}", f"--strategy={strategy}", f"--workdir={workdir}"]
    return shlex.join(args)


def check_no_secrets(text: str, environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if SECRET_NAME.search(name) and len(value) >= 8 and value in text:
            raise SubmitError(f"the job would contain the value of ${name}; secrets must not go into a job (a "
                              "Ray job's record, a batch script: both are stored): set it in the nodes' environment")


def validate(args: argparse.Namespace) -> tuple[str, str]:
    """(absolute config path, workdir); raises on anything the cluster would only fail on later."""
    from toolkit.config import load_config
    from toolkit.distributed.parallel_dims import ParallelDims
    from toolkit.train import preflight

    if args.workers < 1 or args.cpus_per_worker <= 0 or args.max_failures < 0:
        raise SubmitError("--workers must be >= 1, --cpus-per-worker > 0 and --max-failures >= 0")
    workdir = os.path.abspath(args.workdir)
    config = os.path.join(workdir, args.config)
    cfg = load_config(config, args.overrides)
    preflight(cfg, check_data=False)  # a recipe its engine refuses (data paths are the cluster's)
    ParallelDims.from_config(cfg.parallel, args.workers, 0)  # the layout must fit --workers ranks
    return config, workdir


def run(args: argparse.Namespace) -> int:
    config, workdir = validate(args)
    command = entrypoint(config, args.overrides, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                         gpus_per_worker=args.gpus_per_worker, max_failures=args.max_failures,
                         strategy=args.strategy, workdir=workdir, python=args.python)
    check_no_secrets(command, os.environ)
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no Ray cluster given: pass --address http://HEAD:8265 (the dashboard)")

    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=command, metadata={"embedforge": "train", "config": config})
    except (ConnectionError, RuntimeError) as exc:
        print(f"embedforge submit ray: error: could not submit to {address}: {exc}", file=sys.stderr)
        return 1
    print(f"submitted Ray job {job_id} to {address}: {command}", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --address {shlex.quote(address)} --follow {job_id}")
        return 0
    return follow(client, job_id)


def follow(client, job_id: str, poll_s: float = 1.0) -> int:
    """Print the job's log as it grows, then its final status: 0 on SUCCEEDED, its driver's exit code
    (1 if unknown) otherwise. Ctrl-C stops following, not the job."""
    shown = 0
    try:
        while True:
            status = str(client.get_job_status(job_id))
            logs = client.get_job_logs(job_id)
            if len(logs) > shown:
                sys.stdout.write(logs[shown:])
                sys.stdout.flush()
                shown = len(logs)
            if status.rsplit(".", 1)[-1] in TERMINAL:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (ray job stop {job_id} to stop it)")
        return 130
    info = client.get_job_info(job_id)
    status = str(info.status).rsplit(".", 1)[-1]
    print(f"Ray job {job_id}: {status}" + (f" ({info.message})" if info.message and status != "SUCCEEDED" else ""))
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ray", help="submit a recipe as a Ray job (worker group, restarts on failure)",
                              description="Validate a recipe here, then submit it to a Ray cluster as a job that "
                                          "trains on a worker group (one actor per rank) and restarts from the "
                                          "newest complete checkpoint when a worker fails.",
                              epilog=examples("embedforge submit ray configs/quickstart.yaml output_dir=/shared/runs/qs "
                                              "--address http://head:8265 --workers 2",
                                              "embedforge submit ray configs/scale/llama3-8b.yaml --workers 8 "
                                              "--gpus-per-worker 1 --workdir /shared/embedforge --no-wait"))
    p.add_argument("config", help="YAML recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--address", default=None,
                   help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    p.add_argument("--workers", type=int, required=True, help="ranks: one Ray actor (and bundle) each")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each actor requests")
    p.add_argument("--gpus-per-worker", type=int, default=0, choices=[0, 1], help="one rank per GPU")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before the job fails")
    p.add_argument("--strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                   help="placement group strategy (PACK: as few nodes as possible)")
    p.add_argument("--workdir", default=".",
                   help="where the job runs on the cluster: the config and overrides are relative to it (the "
                        "recipe's own paths to the recipe's folder)")
    p.add_argument("--python", default="python", help="the cluster's Python with embedforge installed")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.set_defaults(func=run)
    return take_overrides_anywhere(p)
