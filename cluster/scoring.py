"""Teacher scoring on a Ray cluster: a pool of actors, each loading the teacher once, takes the pending
shards one at a time (a slow or failed shard does not hold the others back).

The job's resume and output layout are `toolkit.teacher.job`'s: an interrupted run re-submitted to
any cluster scores only the shards without a completion sidecar.
"""

from __future__ import annotations

import logging
import os

from cluster.ray_session import ray_session
from toolkit.teacher.job import ScoreJob, finish, load_teacher, pending_shards, score_shard

log = logging.getLogger(__name__)


def _scorer_class(ray):
    @ray.remote
    class ShardScorer:
        def __init__(self, job: ScoreJob):
            import torch

            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
            self.job = job
            self.manifest, _ = pending_shards(job)
            self.teacher = load_teacher(job)

        def score(self, name: str) -> dict:
            shard = next(s for s in self.manifest.shards if s.name == name)
            info = score_shard(self.job, self.manifest, shard, self.teacher)
            return {"name": info.name, "samples": info.samples, "node": ray.get_runtime_context().get_node_id()}

    return ShardScorer


def run_ray(job: ScoreJob, *, address: str | None = None, workers: int = 2, cpus_per_worker: float = 1.0,
            gpus_per_worker: float = 0.0) -> dict:
    """Score every pending shard of `job` with `workers` Ray actors; returns a summary (manifest path
    once complete). `address=None` starts a local cluster; "auto" or "ray://host:port" joins one.
    An actor given GPUs sees only them (Ray sets CUDA_VISIBLE_DEVICES): `device: auto` is its cuda:0."""
    import ray

    manifest, pending = pending_shards(job)
    summary = {"pending": len(pending), "scored": [], "manifest": None}
    if pending:
        with ray_session(address, cpus_per_worker, gpus_per_worker):
            scorer = _scorer_class(ray)
            actors = [scorer.options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker).remote(job) for _ in range(min(workers, len(pending)))]
            pool = ray.util.ActorPool(actors)
            for result in pool.map_unordered(lambda actor, name: actor.score.remote(name), [s.name for s in pending]):
                log.info("scored %s (%d samples)", result["name"], result["samples"])
                summary["scored"].append(result)
    path = finish(job, manifest)
    summary["manifest"] = str(path) if path else None
    return summary
