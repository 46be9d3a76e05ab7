#!/usr/bin/env python
"""Encoding throughput and peak memory: Embedforge `Encoder.encode` vs llm2vec's `LLM2Vec.encode`.

    .venv/bin/python bench/encode_throughput.py [--model asset:smollm2-135m-instruct] [--batch-size 32]
        [--seq-len 128] [--steps 8]

The same real sentences (nlp-corpus) for both; both sort by length before batching.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import prepare, run_worker, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="asset:smollm2-135m-instruct")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed batches")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impls", nargs="+", default=["embedforge", "llm2vec-0.2.3"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, texts, _ = prepare(args.model, 2000, Path(tmp))
        results = [run_worker(impl, "encode", model_dir, texts, args) for impl in args.impls]
    print(f"\nmodel {args.model}, batch {args.batch_size}, max length {args.seq_len}, "
          f"{args.batch_size * args.steps} texts timed, {args.threads} threads\n")
    print(table(results))


if __name__ == "__main__":
    main()
