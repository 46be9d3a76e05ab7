#!/usr/bin/env python
"""Streaming-reader throughput: WebDataset shards through the trainer's loader vs reading JSONL.

    .venv/bin/python bench/data_throughput.py [--samples 50000] [--batch-size 32] [--workers 0 1 2]

Same real sentences (`nlp-corpus`) both ways. Rows: the plain JSONL read (json.loads + validation:
the floor any reader pays), then `StreamingLoader` with 0 / 1 / 2 worker processes, with the
SmolLM2 tokenizer computing lengths for bucketing as in training. tokens/s counts the SmolLM2 tokens
of the samples delivered. Compare with the samples/s a training step consumes (bench/RESULTS.md):
the reader must be far above it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=50000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()

    from transformers import AutoTokenizer

    from data_pipelines.loader import StreamingLoader
    from data_pipelines.manifest import load_manifest
    from data_pipelines.records import BadRecord, validate
    from data_pipelines.writer import build_shards
    from toolkit.assets import nlp_corpus_sentences, resolve_model_path
    from toolkit.config import DataConfig

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("asset:smollm2-135m-instruct"))
    texts = nlp_corpus_sentences(limit=args.samples)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "corpus.jsonl"
        jsonl.write_text("".join(json.dumps({"id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
        t0 = time.perf_counter()
        build_shards([str(jsonl)], Path(tmp) / "shards", "text", shard_samples=5000)
        build_s = time.perf_counter() - t0
        manifest = load_manifest(Path(tmp) / "shards")
        n_batches = len(texts) // args.batch_size
        n = n_batches * args.batch_size

        def tokens_of(samples: list[str]) -> int:
            return sum(len(x) for x in tokenizer(samples, truncation=True, max_length=args.max_length)["input_ids"])

        t0 = time.perf_counter()
        direct = []
        with jsonl.open() as fh:
            for line in fh:
                try:
                    direct.append(validate(json.loads(line), "text")["text"])
                except BadRecord:
                    pass
                if len(direct) == n:
                    break
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        direct_tokens = tokens_of(direct)
        tokenise_s = time.perf_counter() - t0
        rows.append(("JSONL read (json + validate)", n / read_s, direct_tokens))
        rows.append(("JSONL read + tokenise", n / (read_s + tokenise_s), direct_tokens))

        for workers in args.workers:
            cfg = DataConfig(path=str(manifest.root), batch_size=args.batch_size, max_length=args.max_length,
                             num_workers=workers)
            loader = StreamingLoader(manifest, cfg, seed=0, tokenizer=tokenizer)
            got: list[str] = []
            t0 = time.perf_counter()
            for batch in loader:
                got += [s["text"] for s in batch]
                if len(got) >= n:
                    break
            rows.append((f"StreamingLoader, {workers} workers (bucketing, tokenised lengths)",
                         len(got) / (time.perf_counter() - t0), tokens_of(got)))

    print(f"\n{n:,} real sentences, batch {args.batch_size}, shards of 5,000 built in {build_s:.1f} s\n")
    print("| reader | samples/s | tokens/s |\n|---|---|---|")
    for name, sps, tokens in rows:
        print(f"| {name} | {sps:,.0f} | {sps * tokens / n:,.0f} |")


if __name__ == "__main__":
    main()
