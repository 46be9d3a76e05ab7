#!/usr/bin/env python
"""Training-step throughput and peak memory: Embedforge vs the paper's llm2vec==0.2.3, side by side.

    .venv/bin/python bench/train_throughput.py [--model asset:smollm2-135m-instruct] [--batch-size 8]
        [--seq-len 128] [--steps 5] [--warmup-steps 2] [--workloads mntp simcse supervised]

Needs the reference venv (`bash bench/setup_reference_env.sh`). Same model, data (real
nlp-corpus sentences; WordNet triples for supervised), batches and LoRA for both; prints a table.
Embedforge's rows add model FLOPs/s (`ModelArgs.training_flops` on the real lengths) and the MFU
against this CPU's fp32 GEMM peak, measured first at the same thread count.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import gemm_peak_flops, prepare, run_worker, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="asset:smollm2-135m-instruct")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workloads", nargs="+", default=["mntp", "simcse", "supervised"])
    p.add_argument("--impls", nargs="+", default=["embedforge", "embedforge-bucketed", "llm2vec-0.2.3"])
    args = p.parse_args()
    peak = gemm_peak_flops(args.threads)
    print(f"fp32 GEMM peak at {args.threads} threads: {peak / 1e9:,.1f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, texts, triples = prepare(args.model, 2000, Path(tmp))
        results = []
        for workload in args.workloads:
            for impl in args.impls:
                data = triples if workload == "supervised" else texts
                results.append(run_worker(impl, workload, model_dir, data, args))
                print(results[-1], flush=True)
    print(f"\nmodel {args.model}, batch {args.batch_size}, max length {args.seq_len}, {args.steps} timed steps, "
          f"{args.threads} threads, fp32 GEMM peak {peak / 1e9:,.1f} GFLOP/s\n")
    print(table(results, peak))


if __name__ == "__main__":
    main()
