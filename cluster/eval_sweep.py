"""Evaluation sweep jobs as Ray tasks: one task per (model or checkpoint, task group), on a local or a
remote cluster. A task that fails (a worker or node lost) is retried by Ray; whatever finished is in
mteb's result cache on the shared filesystem, so a rerun of the whole sweep recomputes nothing done.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from toolkit.eval.sweep import SweepJob
from toolkit.eval.sweep_report import ResultRow

log = logging.getLogger(__name__)
JobRunner = Callable[[SweepJob], list[ResultRow]]


def run_ray(jobs: list[SweepJob], run_job: JobRunner, *, address: str | None = None, cpus_per_job: float = 1.0,
            max_retries: int = 2) -> list[ResultRow]:
    """Run every job as a Ray task; rows in job order. `address=None` starts a new local cluster here
    (never a stale one from /tmp/ray: that is what address="local" means),
    "auto" or "HOST:PORT" / "ray://HOST:PORT" joins one (its nodes must see the cache folder)."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        threads = str(max(1, int(cpus_per_job)))
        env = {"OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
        if "HF_HUB_OFFLINE" in os.environ:  # as here; otherwise the nodes' own setting
            env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})
    try:
        task = ray.remote(num_cpus=cpus_per_job, max_retries=max_retries, retry_exceptions=True)(_run_one)
        refs = [task.remote(run_job, job) for job in jobs]
        rows: list[ResultRow] = []
        for job, ref in zip(jobs, refs):
            done = ray.get(ref)
            log.info("evaluated %s on %s", job.model.label, ", ".join(job.tasks))
            rows.extend(done)
        return rows
    finally:
        if started_here:
            ray.shutdown()


def _run_one(run_job: JobRunner, job: SweepJob) -> list[ResultRow]:
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    return run_job(job)
