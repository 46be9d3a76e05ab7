"""Per-rank memory while the DeepSpeed engine loads a model: ZeRO-3 (built partitioned) vs ZeRO-2 (whole).

Each variant runs in fresh gloo processes (2 ranks, and 1 rank for reference) on a random Llama of
about 1 GB (fp32) with tied embeddings (the frozen MNTP head is then a gathered copy). After the
imports, a sampler thread records each rank's peak anonymous resident memory (RssAnon: the process's
own tensors; the memory-mapped checkpoint pages rank 0 reads are file cache, shown apart as the peak
of RssFile) while the engine builds the model (`build`) and while DeepSpeed wraps it (`begin_stage`:
`deepspeed.initialize`). ZeRO-2 keeps the whole model on every rank, as every ZeRO stage did before
`zero.Init` loading; ZeRO-3 should hold its partition plus one module gathered whole.

    PYTHONPATH=. .venv/bin/python bench/zero3_load_memory.py [--layers 12 --hidden 1024 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench.common import make_model, status  # noqa: E402


class PeakSampler:
    """Peaks of RssAnon and RssFile, sampled every 2 ms on a thread (the kernel keeps no peak of either)."""

    def __init__(self):
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.anon, self.file = max(self.anon, status("RssAnon")), max(self.file, status("RssFile"))
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.anon, self.file = max(self.anon, status("RssAnon")), max(self.file, status("RssFile"))


def run_config(model_dir: Path, zero_stage: int):
    from toolkit.config import config_from_dict

    return config_from_dict({
        "output_dir": "unused", "seed": 1, "engine": "deepspeed", "zero": {"stage": zero_stage},
        "model": {"path": str(model_dir), "max_length": 64}, "pooling": {"mode": "mean"},
        "stages": [{"name": "s", "steps": 1, "lora": {"enabled": False}, "data": {"path": "x", "max_length": 64},
                    "objective": {"kind": "mntp", "mntp": {"mask_token": "eos"}}}],
    })


def _worker(rank: int, world: int, port: int, model_dir: str, zero_stage: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed  # noqa: F401  (fixed import costs, paid before measuring)
    from transformers.models.llama import modeling_llama  # noqa: F401

    from toolkit.distributed.parallel_dims import ParallelDims, init_distributed
    from toolkit.engines.spec import build_engine

    init_distributed()
    cfg = run_config(Path(model_dir), zero_stage)
    dims = ParallelDims.from_config(cfg.parallel, world, rank)
    engine = build_engine(cfg, dims)
    base, base_file = status("RssAnon"), status("RssFile")
    with PeakSampler() as build:
        engine.build(add_mask_token=False)
    mapped_after = status("RssFile") - base_file  # ZeRO 0-2: the weights are still the mapped checkpoint
    with PeakSampler() as wrap:
        engine.begin_stage(0, cfg.stages[0], data_kind="text", generator=torch.Generator())
    own = sum(t.numel() * t.element_size() for t in (getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None)
                                                     is not None else p for p in engine.ds.module.parameters()))
    row = {"zero": zero_stage, "world": world, "rank": rank, "base": base, "build_anon": build.anon - base,
           "build_file": build.file - base_file, "mapped_after": mapped_after, "wrap_anon": wrap.anon - base, "own": own}
    (Path(out) / f"row-{zero_stage}-{world}-{rank}.json").write_text(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    from tests.helpers import free_port

    # glibc raises its mmap threshold after each large free, so later tensors come from the heap and a
    # freed one (a module gathered whole, then released) stays resident: a fixed threshold returns
    # every large tensor's memory when it is freed, so the peaks are what the tensors held
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_model(tmp / "model", args.layers, args.hidden, args.vocab, tie_word_embeddings=True)
        total = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        for zero_stage, world in ((2, 2), (3, 2), (3, 1)):
            mp.spawn(_worker, args=(world, free_port(), str(model_dir), zero_stage, str(tmp)), nprocs=world, join=True)
        rows = [json.loads(p.read_text()) for p in sorted(tmp.glob("row-*.json"))]
        mb = 2**20
        print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, tied embeddings; "
              f"checkpoint {total / mb:.0f} MB (fp32)")
        print("| ZeRO stage | ranks | rank | own weights after wrap MB | build: peak anon MB | build: peak mapped "
              "checkpoint MB | mapped after build MB | deepspeed.initialize: peak anon MB |")
        print("|---|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["zero"], r["world"], r["rank"])):
            print(f"| {r['zero']} | {r['world']} | {r['rank']} | {r['own'] / mb:.0f} | {r['build_anon'] / mb:.0f} "
                  f"| {r['build_file'] / mb:.0f} | {r['mapped_after'] / mb:.0f} | {r['wrap_anon'] / mb:.0f} |")
        print("anon = RssAnon above the process's own after imports (its tensors); mapped = file-backed RSS above "
              "the same point (safetensors pages: ZeRO 0-2 keep the weights as the mapped checkpoint until "
              "DeepSpeed flattens them; ZeRO-3's rank 0 maps the file only while it copies it in). "
              "deepspeed.initialize adds DeepSpeed's flat partitions, fp32 masters and gradient buffers.")


if __name__ == "__main__":
    main()
