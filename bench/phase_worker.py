#!/usr/bin/env python
"""One rank of `bench/memory_layouts.py`: the real trainer, with each engine phase's memory peak.

    torchrun --nproc-per-node N bench/phase_worker.py CONFIG [key=value ...] --report DIR

Instrumentation only: the engine's `build`, `train_step`, `save` and `end_stage` (the stage's export)
are wrapped; before each call the kernel's peak-RSS counter (VmHWM) is reset and glibc's in-use heap
is sampled every 10 ms (`engine_worker.HeapSampler`), so each phase reports its own peak: what this
rank actually held while building, stepping, saving and exporting. The rank's own share of the
model (the parameters of its module) is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_worker import HeapSampler, _status_mb  # noqa: E402

PHASES = {"build": "build", "step": "train_step", "save": "save", "export": "end_stage"}


def instrument(engine, memory: dict) -> None:
    heap = HeapSampler()

    def wrap(phase: str, method):
        def run(*args, **kwargs):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            before = heap.in_use()
            heap.start()
            try:
                return method(*args, **kwargs)
            finally:
                heap.stop()
                heap._stop.clear()
                seen = memory.setdefault(phase, {"peak_heap_mb": 0.0, "peak_rss_mb": 0.0, "heap_before_mb": 0.0})
                seen["peak_heap_mb"] = max(seen["peak_heap_mb"], heap.peak / 2**20)
                seen["peak_rss_mb"] = max(seen["peak_rss_mb"], _status_mb("VmHWM"))
                seen["heap_before_mb"] = max(seen["heap_before_mb"], before / 2**20)
        return run

    for phase, name in PHASES.items():
        setattr(engine, name, wrap(phase, getattr(engine, name)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--report", required=True)
    args = p.parse_args()

    import torch

    import toolkit.train as train
    from toolkit.config import load_config

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", "1"))))
    memory: dict = {}
    engines = []
    build = train.build_engine

    def instrumented(*args, **kwargs):
        engine = build(*args, **kwargs)
        instrument(engine, memory)
        engines.append(engine)
        return engine

    train.build_engine = instrumented
    trainer = train.Trainer(load_config(args.config, args.overrides), resume="never")
    trainer.run()
    model = getattr(engines[0], "model", None)
    own = sum(t.numel() * t.element_size() for t in model.parameters()) if model is not None else 0
    report = {"rank": trainer.dims.rank, "own_shard_mb": own / 2**20, "phases": memory}
    Path(args.report).mkdir(parents=True, exist_ok=True)
    (Path(args.report) / f"rank-{trainer.dims.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
