"""A Ray connection for one driver-side job (teacher scoring, an evaluation sweep): joined if this
process is already connected, else started or joined here and shut down after.

`address=None` starts a NEW local cluster (address="local": never a stale one recorded in /tmp/ray);
"auto" or "HOST:PORT" / "ray://HOST:PORT" joins one. Workers get one BLAS thread per CPU they hold,
no tokenizer threads, and the driver's HF_HUB_OFFLINE where it is set (else the nodes' own).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from toolkit.errors import InputError


@contextlib.contextmanager
def ray_session(address: str | None, cpus_per_worker: float, gpus_per_worker: float = 0.0) -> Iterator[None]:
    """... and, when workers ask for GPUs, a cluster without that many is refused in one line (Ray
    would otherwise keep the tasks pending forever)."""
    import ray

    if ray.is_initialized():
        _check_gpus(gpus_per_worker)
        yield
        return
    env = {"OMP_NUM_THREADS": str(max(1, int(cpus_per_worker))), "TOKENIZERS_PARALLELISM": "false"}
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        _check_gpus(gpus_per_worker)
        yield
    finally:
        ray.shutdown()


def _check_gpus(per_worker: float) -> None:
    import ray

    have = ray.cluster_resources().get("GPU", 0.0)
    if per_worker > have:
        raise InputError(f"each Ray worker asks for {per_worker:g} GPU(s) but the cluster has {have:g}; "
                         "lower --gpus-per-worker / --gpus-per-job, or join a cluster with GPUs")
