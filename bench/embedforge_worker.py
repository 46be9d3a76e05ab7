#!/usr/bin/env python
"""Embedforge side of the throughput benchmarks: one workload in one process, one JSON line out.

Same CLI, data, batches, LoRA and token accounting as `bench/reference_llm2vec.py`, so the two are
comparable line by line: texts are taken in file order (cycling), `batch_size` per step, truncated
to `seq_len`; `real` tokens are non-pad tokens seen by the transformer (SimCSE counts both views,
supervised counts query + positive + negative). Differences are Embedforge's own: MNTP computes
vocabulary logits only at masked positions; encoding sorts by length (as llm2vec does too).
`--batching bucketed` reorders the same records into the trainer's length-bucketed batches, to
measure what bucketing adds on top.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import warnings

IMPL = "embedforge"
DEFAULTS = {"mntp": dict(lr=5e-5), "simcse": dict(lr=3e-5, temperature=0.05, attn_dropout=0.3),
            "supervised": dict(lr=2e-4, temperature=0.02)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--workload", choices=["mntp", "simcse", "supervised", "encode"], required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--texts", required=True, help="JSONL: text / query,positive,negative[,instruction]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batching", choices=["file", "bucketed"], default="file",
                   help="file: batches in file order, as the reference; bucketed: the trainer's length-bucketed BatchPlan")
    return p.parse_args(argv)


def take(items, start, n):
    return [items[(start + i) % len(items)] for i in range(n)]


def bucketed(records: list[dict], tokenizer, batch_size: int, seed: int) -> list[dict]:
    """The same records, reordered into the trainer's length-bucketed batches (less padding)."""
    import numpy as np

    from data_pipelines.batching import window_batches

    fields = [[r[k] for k in ("text", "query", "positive", "negative") if r.get(k)] for r in records]
    lengths = [max(len(ids) for ids in tokenizer(f)["input_ids"]) for f in fields]
    window = 16 * batch_size  # the trainer's default data.bucket_batches
    out = []
    for start in range(0, len(records), window):
        part = lengths[start : start + window]
        rng = np.random.default_rng([seed, start])
        out += [records[start + i] for batch in window_batches(part, batch_size, rng) for i in batch]
    return out


def sequence_lengths(record: dict, workload: str, tokenizer, seq_len: int) -> list[int]:
    """Token lengths of the sequences one sample puts through the transformer (SimCSE: two views;
    supervised: query with its instruction, positive, negative), truncated as the step truncates."""
    def n(text: str) -> int:
        return min(len(tokenizer(text)["input_ids"]), seq_len)
    if workload == "supervised":
        query = " ".join(t for t in (record.get("instruction"), record["query"]) if t)
        return [n(query), n(record["positive"]), *(n(t) for t in record["negatives"])]
    return [n(record["text"])] * (2 if workload == "simcse" else 1)


def model_flops(samples: list[dict], workload: str, tokenizer, seq_len: int, model_dir: str) -> int:
    """Model FLOPs of training on these samples (`ModelArgs.training_flops`, frozen base + LoRA), on
    each sequence's real length: padding and recomputation are not useful work. MNTP's LM head runs
    on the masked positions only: 20% of the real tokens (the bench's mask probability)."""
    from pathlib import Path

    from toolkit.models.arch import read_model_args

    arch = read_model_args(Path(model_dir) / "config.json")
    total = 0
    for record in samples:
        for length in sequence_lengths(record, workload, tokenizer, seq_len):
            head = round(0.2 * length) if workload == "mntp" else 0
            total += arch.training_flops(length, head_tokens=head, full=False)
    return total


def main(argv=None) -> int:
    args = parse_args(argv)
    real_stdout, sys.stdout = sys.stdout, sys.stderr
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from toolkit.config import (
        DataConfig,
        LoraConfig,
        MNTPConfig,
        ModelConfig,
        ObjectiveConfig,
        PoolingConfig,
        StageConfig,
    )
    from toolkit.models.loading import build_encoder, set_attention_dropout
    from toolkit.models.lora import add_lora
    from toolkit.objectives.steps import build_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    records = [json.loads(line) for line in open(args.texts) if line.strip()]
    t_load = time.perf_counter()
    encoder, lm_head = build_encoder(ModelConfig(path=args.model, max_length=args.seq_len), PoolingConfig(mode="mean"))
    load_s = time.perf_counter() - t_load
    bs = args.batch_size
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # noqa: E731

    if args.batching == "bucketed":
        records = bucketed(records, encoder.tokenizer, bs, args.seed)
    if args.workload == "encode":
        texts = [r["text"] for r in records]
        nw, nt = bs * args.warmup_steps, bs * args.steps
        if nw:
            encoder.encode(take(texts, 0, nw), batch_size=bs)
        timed = take(texts, nw, nt)
        real = sum(min(len(x), args.seq_len) for x in encoder.tokenizer(timed)["input_ids"])
        t0 = time.perf_counter()
        emb = encoder.encode(timed, batch_size=bs)
        elapsed = time.perf_counter() - t0
        out = {"tokens_per_s": real / elapsed, "step_s": elapsed / math.ceil(nt / bs), "texts_per_s": nt / elapsed,
               "embedding_dim": int(emb.shape[1]), "loss": None}
    else:
        d = DEFAULTS[args.workload]
        kind = "pair" if args.workload == "supervised" else "text"  # the sample kind the step consumes
        objective = ObjectiveConfig(kind=args.workload, temperature=d.get("temperature", 0.05),
                                    mntp=MNTPConfig(mask_probability=0.2, strategy="bert", mask_token="underscore"))
        stage = StageConfig(name=args.workload, objective=objective, steps=args.steps,
                            data=DataConfig(path=args.texts, max_length=args.seq_len, batch_size=bs))
        if "attn_dropout" in d:
            set_attention_dropout(encoder.backbone, d["attn_dropout"])
        encoder.backbone = add_lora(encoder.backbone, LoraConfig(r=16, alpha=32, dropout=0.05))
        params = [p for p in encoder.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=d["lr"])
        step_fn = build_step(stage, encoder, lm_head, torch.Generator().manual_seed(args.seed), data_kind=kind)
        encoder.train()
        if kind == "pair":
            records = [{"query": r["query"], "positive": r["positive"], "negatives": [r["negative"]],
                        "instruction": r.get("instruction"), "task": "bench"} for r in records]

        def step(i: int):
            stats = step_fn.step(take(records, i * bs, bs), 1.0)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return stats

        for i in range(args.warmup_steps):
            step(i)
        times, real, loss = [], 0, None
        for j in range(args.steps):
            t0 = time.perf_counter()
            stats = step(args.warmup_steps + j)
            times.append(time.perf_counter() - t0)
            real += stats.tokens
            loss = stats.loss
        elapsed = sum(times)
        timed = [r for j in range(args.steps) for r in take(records, (args.warmup_steps + j) * bs, bs)]
        flops = model_flops(timed, args.workload, encoder.tokenizer, args.seq_len, args.model)
        out = {"tokens_per_s": real / elapsed, "step_s": elapsed / args.steps, "loss": loss,
               "model_flops_per_s": flops / elapsed}
    out = {"impl": IMPL + ("-bucketed" if args.batching == "bucketed" else ""), "workload": args.workload, **out, "real_tokens_per_s": out["tokens_per_s"],
           "peak_rss_mb": round(peak(), 1), "load_s": load_s, "batch_size": bs, "seq_len": args.seq_len,
           "threads": args.threads}
    print(json.dumps(out), file=real_stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
