#!/usr/bin/env python
"""Packed vs padded training micro-batches (`data.pack`): computed token slots, FLOPs and step time.

    .venv/bin/python bench/packing.py [--model asset:smollm2-135m-instruct] [--batch-size 16]
        [--seq-len 128] [--steps 6] [--threads 2]

The same random (not length-bucketed) batches of real sentences (nlp-corpus) go through one MNTP
training step of the hf engine (LoRA, fp32, sdpa) with and without packing, alternating padded /
packed per batch so both see the same machine load; losses are printed to show they agree.
FLOPs are the model FLOPs of the slots computed (ModelArgs.training_flops per row).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, prepare

sys.path.insert(0, str(ROOT))
from toolkit.config import config_from_dict  # noqa: E402
from toolkit.distributed.parallel_dims import ParallelDims  # noqa: E402
from toolkit.engines.spec import build_engine  # noqa: E402
from toolkit.models.arch import ModelArgs  # noqa: E402
from toolkit.models.packing import pack_for_backbone  # noqa: E402


def engine_for(model_dir: Path, seq_len: int, pack: bool):
    cfg = config_from_dict({
        "output_dir": "unused", "seed": 0, "engine": "hf", "model": {"path": str(model_dir), "max_length": seq_len},
        "stages": [{"name": "mntp", "steps": 1, "objective": {"kind": "mntp", "mntp": {"mask_token": "eos"}},
                    "data": {"path": "unused", "max_length": seq_len, "pack": pack}}]})
    engine = build_engine(cfg, ParallelDims.from_config(cfg.parallel, 1, 0))
    engine.build(add_mask_token=False)
    engine.begin_stage(0, cfg.stages[0], data_kind="text", generator=torch.Generator().manual_seed(0))
    return engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="asset:smollm2-135m-instruct")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, texts_path, _ = prepare(args.model, 2000, Path(tmp))
        texts = [json.loads(line)["text"] for line in texts_path.read_text().splitlines()]
        engines = {pack: engine_for(model_dir, args.seq_len, pack) for pack in (False, True)}
        arch = ModelArgs.from_hf_config(engines[False].encoder.backbone.config)
        rng = torch.Generator().manual_seed(0)
        rows = {False: [], True: []}
        for step in range(args.steps + 1):  # the first batch warms up, untimed
            idx = torch.randperm(len(texts), generator=rng)[: args.batch_size].tolist()
            batch = [{"text": texts[i]} for i in idx]
            tok = engines[False].encoder.tokenize([b["text"] for b in batch], max_length=args.seq_len)
            packed = pack_for_backbone(tok["input_ids"], tok["attention_mask"], "sdpa")
            shapes = {False: tuple(tok["input_ids"].shape), True: tuple(packed.input_ids.shape)}
            for pack in (False, True):
                engine = engines[pack]
                engine.optimizer.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                stats = engine.step_fn.step(batch, 1.0)
                seconds = time.perf_counter() - t0
                n, width = shapes[pack]
                flops = n * arch.training_flops(width, full=False)
                if step:
                    rows[pack].append({"slots": n * width, "flops": flops, "s": seconds, "loss": stats.loss})
    print(f"\nmodel {args.model}, MNTP (LoRA, fp32, sdpa), batch {args.batch_size}, max length {args.seq_len}, "
          f"{args.steps} random batches, {args.threads} threads\n")
    print(f"{'layout':8} {'token slots':>12} {'GFLOP/step':>11} {'s/step':>8} {'mean loss':>10}")
    base = None
    for pack in (False, True):
        r = rows[pack]
        slots, flops = statistics.mean(x["slots"] for x in r), statistics.mean(x["flops"] for x in r)
        sec, loss = statistics.median(x["s"] for x in r), statistics.mean(x["loss"] for x in r)
        print(f"{'packed' if pack else 'padded':8} {slots:12.0f} {flops / 1e9:11.1f} {sec:8.3f} {loss:10.5f}")
        base = base or (slots, flops, sec)
    print(f"\npacked / padded: slots x{slots / base[0]:.2f}, FLOPs x{flops / base[1]:.2f}, step time x{sec / base[2]:.2f}")


if __name__ == "__main__":
    main()
