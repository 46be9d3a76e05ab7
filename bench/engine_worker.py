#!/usr/bin/env python
"""One rank of `bench/engines.py`: runs a recipe through the real trainer and reports, per rank, the
optimizer-step times and the peak memory while training (the model load's peak excluded).

    torchrun --nproc-per-node 2 bench/engine_worker.py CONFIG [key=value ...] --report DIR --warmup N

Instrumentation only: the engine's `train_step` is timed; the kernel's peak-RSS counter (VmHWM) is
reset once the warm-up steps are done, so the peak is that of the timed steps. RSS keeps memory the
allocator freed but did not return (the full weights every rank loads before ZeRO-3 partitions
them, say), so a sampler thread also reads glibc's in-use heap bytes (mallinfo2: what tensors and
Python objects hold, the CPU analogue of torch.cuda.max_memory_allocated) every 10 ms.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import threading
import time
from pathlib import Path


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class HeapSampler:
    """Peak of glibc's allocated bytes (small-block arenas + mmapped blocks), sampled while running."""

    def __init__(self, period_s: float = 0.01):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        self._mallinfo, self.period_s, self.peak = libc.mallinfo2, period_s, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def in_use(self) -> int:
        info = self._mallinfo()
        return info.uordblks + info.hblkhd

    def start(self) -> None:
        self.peak = self.in_use()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, self.in_use())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.in_use())


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--report", required=True)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    import torch

    import toolkit.train as train
    from toolkit.config import load_config

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", "1"))))
    step_times: list[float] = []
    memory: dict[str, float] = {}
    heap = HeapSampler()
    build = train.build_engine

    def instrumented(cfg, dims):
        engine = build(cfg, dims)
        step = engine.train_step

        def timed(micro_batches):
            if len(step_times) == args.warmup:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the timed steps' peak only
                memory["rss_before_mb"] = _status_mb("VmRSS")
                memory["heap_before_mb"] = heap.in_use() / 2**20
                heap.start()
            t0 = time.perf_counter()
            result = step(micro_batches)
            step_times.append(time.perf_counter() - t0)
            memory["peak_rss_mb"], memory["rss_after_mb"] = _status_mb("VmHWM"), _status_mb("VmRSS")
            return result

        engine.train_step = timed
        return engine

    train.build_engine = instrumented
    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    trainer = train.Trainer(cfg, resume="never")
    trainer.run()
    heap.stop()
    memory["peak_heap_mb"] = heap.peak / 2**20
    timed = step_times[args.warmup:]
    rank = trainer.dims.rank
    report = {"rank": rank, "steps_timed": len(timed), "step_s": sum(timed) / max(1, len(timed)),
              "step_s_min": min(timed, default=float("nan")), "run_s": time.perf_counter() - t0,
              "max_rss_whole_run_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **memory}
    Path(args.report).mkdir(parents=True, exist_ok=True)
    (Path(args.report) / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
