"""Evaluation sweep jobs as Ray tasks: one task per (model or checkpoint, task group), on a local or a
remote cluster. A task that fails (a worker or node lost) is retried by Ray; whatever finished is in
mteb's result cache on the shared filesystem, so a rerun of the whole sweep recomputes nothing done.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from cluster.ray_session import ray_session
from toolkit.eval.sweep import SweepJob
from toolkit.eval.sweep_report import ResultRow

log = logging.getLogger(__name__)
JobRunner = Callable[[SweepJob], list[ResultRow]]


def run_ray(jobs: list[SweepJob], run_job: JobRunner, *, address: str | None = None, cpus_per_job: float = 1.0,
            gpus_per_job: float = 0.0, max_retries: int = 2) -> list[ResultRow]:
    """Run every job as a Ray task; rows in job order. `address` as in `ray_session` (a cluster
    joined must see the cache folder on its nodes). A task given GPUs sees only them (Ray sets
    CUDA_VISIBLE_DEVICES): `--device auto` is its cuda:0."""
    import ray

    with ray_session(address, cpus_per_job, gpus_per_job):
        task = ray.remote(num_cpus=cpus_per_job, num_gpus=gpus_per_job, max_retries=max_retries,
                          retry_exceptions=True)(_run_one)
        refs = [task.remote(run_job, job) for job in jobs]
        rows: list[ResultRow] = []
        for job, ref in zip(jobs, refs):
            rows.extend(ray.get(ref))
            log.info("evaluated %s on %s", job.model.label, ", ".join(job.tasks))
        return rows


def _run_one(run_job: JobRunner, job: SweepJob) -> list[ResultRow]:
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    return run_job(job)
