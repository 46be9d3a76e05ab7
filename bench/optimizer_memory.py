"""Optimizer-state bytes per rank and step time: the megatron engine's distributed optimizer vs torch AdamW.

For each DP size (gloo processes on this machine, TP = PP = 1), one process group runs, one after
the other, full fine-tuning MNTP steps with: the plain path (fp32, replicated AdamW), the
distributed optimizer in fp32 (the weights are the masters) and in bf16 (bf16 weights + fp32
masters). Bytes are measured on the real tensors each rank holds (Adam m, v; + fp32 masters);
step time is the median over the timed steps, and its ratio is against the plain path of the same
sitting (same processes, same batches).

    python bench/optimizer_memory.py [--model asset:smollm2-135m-instruct] [--dps 1,2,4] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = (("plain", "float32", False), ("distributed", "float32", True), ("distributed", "bfloat16", True))


def config(model: str, dtype: str, distributed: bool, seq: int):
    from toolkit.config import config_from_dict

    return config_from_dict({
        "output_dir": "unused", "seed": 0, "engine": "megatron",
        "parallel": {"distributed_optimizer": distributed},
        "model": {"path": model, "max_length": seq, "dtype": dtype},
        "pooling": {"mode": "mean"},
        "stages": [{"name": "mntp", "steps": 100, "lora": {"enabled": False},
                    "data": {"path": "unused", "max_length": seq}, "precision": "bf16" if dtype == "bfloat16" else "fp32",
                    "objective": {"kind": "mntp", "mntp": {"mask_probability": 0.2, "mask_token": "eos"}},
                    "optimizer": {"lr": 1e-5}}],
    })


def state_bytes(engine) -> int:
    opt = engine.optimizer
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    return sum(t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items()
               if k in ("exp_avg", "exp_avg_sq"))


def worker(rank: int, world: int, port: int, args, texts: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from toolkit.distributed.parallel_dims import ParallelDims
    from toolkit.engines.megatron.engine import MegatronEngine

    rows = []
    for kind, dtype, distributed in MODES:
        cfg = config(args.model, dtype, distributed, args.seq)
        dims = ParallelDims.from_config(cfg.parallel, world, rank)
        engine = MegatronEngine(cfg, dims)
        engine.build(add_mask_token=False)
        engine.begin_stage(0, cfg.stages[0], data_kind="text", generator=torch.Generator().manual_seed(0))
        times, losses = [], []
        for step in range(args.steps + 1):  # step 0 warms up (allocates the Adam state)
            start = rank * args.batch + step * world * args.batch
            shard = [{"text": texts[(start + i) % len(texts)]} for i in range(args.batch)]
            dist.barrier()
            t0 = time.perf_counter()
            result = engine.train_step([shard])
            dist.barrier()
            if step:
                times.append(time.perf_counter() - t0)
                losses.append(result.loss)
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, state_bytes(engine))
        rows.append({"dp": world, "optimizer": kind, "dtype": dtype, "state_bytes": per_rank,
                     "trainable": sum(p.numel() for p in engine.params.values()),
                     "step_s": statistics.median(times), "loss": losses[-1]})
        del engine
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(rows: list[dict]) -> str:
    lines = ["| DP | optimizer | weights | trainable params | optimizer state / rank (max) | x DP1 same mode | "
             "median step s | step time vs plain |", "|---|---|---|---|---|---|---|---|"]
    base = {(r["optimizer"], r["dtype"]): max(r["state_bytes"]) for r in rows if r["dp"] == 1}
    plain = {r["dp"]: r["step_s"] for r in rows if r["optimizer"] == "plain"}
    for r in rows:
        mine = max(r["state_bytes"])
        ref = base.get((r["optimizer"], r["dtype"]))
        scale = f"{mine / ref:.3f}" if ref else "n/a"
        lines.append(f"| {r['dp']} | {r['optimizer']} | {r['dtype']} | {r['trainable'] / 1e6:.1f} M | "
                     f"{mine / 2**20:.1f} MiB | {scale} | {r['step_s']:.2f} | {r['step_s'] / plain[r['dp']]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="asset:smollm2-135m-instruct")
    p.add_argument("--dps", default="1,2,4")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2, help="texts per DP rank per step")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    from toolkit.assets import nlp_corpus_sentences, resolve_model_path

    args.model = str(resolve_model_path(args.model))
    texts = nlp_corpus_sentences(limit=256)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dp in (int(x) for x in args.dps.split(",")):
            out = str(Path(tmp) / f"dp{dp}.json")
            mp.spawn(worker, args=(dp, free_port(), args, texts, out), nprocs=dp, join=True)
            rows += json.loads(Path(out).read_text())
    print(f"model {args.model}; MNTP full fine-tuning, {args.batch} x {args.seq} tokens per DP rank, "
          f"{args.steps} timed steps, {args.threads} thread(s) per rank, {os.cpu_count()} CPU cores")
    print(table(rows))


if __name__ == "__main__":
    main()
