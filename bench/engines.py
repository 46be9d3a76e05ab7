#!/usr/bin/env python
"""One recipe on every engine, side by side: step time and peak memory per rank.

    .venv/bin/python bench/engines.py [--model asset:smollm2-135m-instruct] [--workload mntp]
        [--lora] [--precision fp32|bf16] [--batch-size 4] [--seq-len 64] [--steps 4] [--warmup-steps 2] [--nproc 2]
        [--variants hf megatron-dp megatron-pp deepspeed-0 ... deepspeed-3-offload]

Each variant runs the same one-stage recipe (real SmolLM2 weights, real nlp-corpus sentences or
WordNet pairs, same seed, batches and optimizer) through `torchrun` and the real trainer, one after
the other on this machine; `bench/engine_worker.py` times each optimizer step and reads each rank's
peak RSS over the timed steps (the model load excluded). Ratios are against `hf` of the same sitting.
Full fine-tuning (the default) is where ZeRO shows: Adam moments, gradients and weights of 135M
parameters are what stages 1, 2 and 3 partition.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = ROOT / ".venv" / "bin" / "python"
VARIANTS = {
    "hf": ["engine=hf"],
    "megatron-dp": ["engine=megatron"],
    "megatron-pp": ["engine=megatron", "parallel.pp=2"],
    "deepspeed-0": ["engine=deepspeed", "zero.stage=0"],
    "deepspeed-1": ["engine=deepspeed", "zero.stage=1"],
    "deepspeed-2": ["engine=deepspeed", "zero.stage=2"],
    "deepspeed-3": ["engine=deepspeed", "zero.stage=3"],
    "deepspeed-3-release": ["engine=deepspeed", "zero.stage=3", "zero.max_live_parameters=5000000",
                            "zero.max_reuse_distance=0", "zero.prefetch_bucket_size=5000000"],
    "deepspeed-2-offload": ["engine=deepspeed", "zero.stage=2", "zero.offload_optimizer=cpu"],
    "deepspeed-3-offload": ["engine=deepspeed", "zero.stage=3", "zero.offload_optimizer=cpu",
                            "zero.offload_params=cpu"],
}
DATA = {"mntp": "asset:nlp-corpus", "simcse": "asset:nlp-corpus", "supervised": "asset:wordnet-pairs"}


def recipe(args, out: Path) -> Path:
    objective = {"kind": args.workload}
    if args.workload == "mntp":
        objective["mntp"] = {"mask_token": "eos"}
    stage = {"name": args.workload, "steps": args.warmup_steps + args.steps, "objective": objective,
             "data": {"path": DATA[args.workload], "batch_size": args.batch_size, "max_length": args.seq_len,
                      "mode": "resampled"},
             "lora": {"enabled": args.lora}, "optimizer": {"lr": 1e-5}, "precision": args.precision}
    cfg = {"output_dir": str(out / "run"), "seed": 0, "model": {"path": args.model, "max_length": args.seq_len},
           "stages": [stage], "checkpoint": {"every_steps": 0},
           "logging": {"every_steps": 1, "tensorboard": False, "progress": False}}
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_variant(name: str, cfg: Path, args, work: Path) -> dict:
    report = work / name
    cmd = [str(PY), "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           str(ROOT / "bench" / "engine_worker.py"), str(cfg), f"output_dir={work / ('run-' + name)}",
           *VARIANTS[name], "--report", str(report), "--warmup", str(args.warmup_steps)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    ranks = [json.loads(f.read_text()) for f in sorted(report.glob("rank-*.json"))] if report.is_dir() else []
    if proc.returncode != 0 or len(ranks) != args.nproc:
        lines = proc.stderr.strip().splitlines()
        tail = [line for line in lines
                if re.match(r"\[rank\d+\]: \w+(Error|Exception)", line) or "error:" in line][-1:] or ["failed"]
        return {"variant": name, "error": tail[0][:200]}
    return {"variant": name, "ranks": ranks, "step_s": max(r["step_s"] for r in ranks),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "peak_heap_mb": max(r["peak_heap_mb"] for r in ranks)}


def table(results: list[dict], nproc: int) -> str:
    ranks = " / ".join(f"r{i}" for i in range(nproc))
    rows = [f"| engine | step s | vs hf | peak allocated MB per rank ({ranks}) | vs hf | peak RSS MB ({ranks}) "
            f"| vs hf |", "|---|---|---|---|---|---|---|"]
    base = next((r for r in results if r["variant"] == "hf" and "error" not in r), None)
    for r in results:
        if "error" in r:
            rows.append(f"| {r['variant']} | error: {r['error']} | | | | | |")
            continue
        heap = " / ".join(f"{x['peak_heap_mb']:,.0f}" for x in r["ranks"])
        rss = " / ".join(f"{x['peak_rss_mb']:,.0f}" for x in r["ranks"])
        speed = f"{r['step_s'] / base['step_s']:.2f}x" if base else ""
        heap_ratio = f"{r['peak_heap_mb'] / base['peak_heap_mb']:.2f}" if base else ""
        rss_ratio = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if base else ""
        rows.append(f"| {r['variant']} | {r['step_s']:.3f} | {speed} | {heap} | {heap_ratio} | {rss} | {rss_ratio} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="asset:smollm2-135m-instruct")
    p.add_argument("--workload", choices=sorted(DATA), default="mntp")
    p.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    p.add_argument("--batch-size", type=int, default=4, help="per rank")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast on hf / megatron, DeepSpeed's bf16 mode (bf16 weights, fp32 master)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = recipe(args, work)
        results = []
        for name in args.variants:
            results.append(run_variant(name, cfg, args, work))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(f"\n{args.model}, {args.workload} ({'LoRA' if args.lora else 'full fine-tuning'}, {args.precision}), "
          f"{args.nproc} ranks x "
          f"batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps after {args.warmup_steps}\n")
    print(table(results, args.nproc))


if __name__ == "__main__":
    main()
