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


@contextlib.contextmanager
def ray_session(address: str | None, cpus_per_worker: float) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    env = {"OMP_NUM_THREADS": str(max(1, int(cpus_per_worker))), "TOKENIZERS_PARALLELISM": "false"}
    if "HF_HUB_OFFLINE" in os.environ:
        env["HF_HUB_OFFLINE"] = os.environ["HF_HUB_OFFLINE"]
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        yield
    finally:
        ray.shutdown()
