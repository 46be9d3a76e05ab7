#!/usr/bin/env python
"""Model-FLOPs utilisation of one bidirectional MNTP training step of a model built from a config.

    .venv/bin/python bench/mntp_mfu.py --device cuda --dtype bfloat16 --size 1b [--attn sdpa|flash_attention_2]
    .venv/bin/python bench/mntp_mfu.py --device cpu --dtype float32 --size small   # what this CPU reaches

Random weights (no download), full fine-tuning, AdamW, random tokens, 20% of positions masked, the
toolkit's own bidirectional conversion and MNTP loss (logits at masked rows only), optionally packed
(`--pack`: texts of random lengths, models/packing.py). MFU = ModelArgs.training_flops of the tokens
computed / median step time / this device's measured GEMM peak in the same dtype (bench/common.py).
Prints one Markdown row for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import ROOT, gemm_peak_flops

sys.path.insert(0, str(ROOT))
from toolkit.models.arch import ModelArgs  # noqa: E402
from toolkit.models.bidirectional import make_bidirectional  # noqa: E402
from toolkit.models.packing import pack_for_backbone  # noqa: E402
from toolkit.objectives.mntp import IGNORE_INDEX, mntp_loss  # noqa: E402

SIZES = {  # Llama shapes; "1b" is Llama-3.2-1B's
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--pack", action="store_true", help="random lengths in [seq-len/4, seq-len], packed")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    from transformers import AutoConfig, AutoModel

    gemm_n = 8192 if args.device.startswith("cuda") else 2048
    peak = gemm_peak_flops(args.threads, n=gemm_n, device=args.device, dtype=args.dtype)  # before and after the steps

    dtype = getattr(torch, args.dtype)
    config = AutoConfig.for_model("llama", max_position_embeddings=max(args.seq_len, 2048), **SIZES[args.size])
    make_bidirectional(config)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModel.from_config(config, attn_implementation=args.attn, dtype=dtype)
        head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
    model.train()
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-5)
    arch = ModelArgs.from_hf_config(config)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    times, flops = [], []
    for step in range(args.steps + 2):  # two warm-up steps
        b, s = args.batch_size, args.seq_len
        ids = torch.randint(3, config.vocab_size, (b, s), generator=gen)
        lengths = torch.randint(s // 4, s + 1, (b,), generator=gen) if args.pack else torch.full((b,), s)
        mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
        labels = torch.where((torch.rand(b, s, generator=gen) < 0.2) & mask.bool(), ids, IGNORE_INDEX)
        ids, mask, labels = ids.to(args.device), mask.to(args.device), labels.to(args.device)
        sync()
        t0 = time.perf_counter()
        if args.pack:
            packed = pack_for_backbone(ids, mask, args.attn)
            m = packed.attention_mask(args.attn, dtype)
            out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=m)
            hidden = packed.unpack(out.last_hidden_state)
            # the varlen kernel attends within each text (sum of L^2); a block mask still computes T^2 per row
            rows = ([(1, int(n)) for n in lengths] if m is None
                    else [(packed.input_ids.shape[0], packed.input_ids.shape[1])])
        else:
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            rows = [(b, s)]
        loss = mntp_loss(hidden, head, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= 2:
            times.append(time.perf_counter() - t0)
            masked = int((labels[:, 1:] != IGNORE_INDEX).sum())
            flops.append(sum(n * arch.training_flops(w) for n, w in rows) + arch.training_flops(0, head_tokens=masked))
    peak = max(peak, gemm_peak_flops(args.threads, n=gemm_n, device=args.device, dtype=args.dtype))  # best of both
    sec = statistics.median(times)
    achieved = statistics.mean(flops) / sec
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({args.threads} threads)"
    print("\n| device | model | dtype | attn | batch x len | packed | step s | model TFLOP/s | GEMM peak TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    params = sum(t.numel() for t in model.parameters()) + head.weight.numel()
    print(f"| {device} | llama {args.size} ({params / 1e9:.2f} B) | {args.dtype} | {args.attn} "
          f"| {args.batch_size} x {args.seq_len} | {args.pack} | {sec:.3f} | {achieved / 1e12:.2f} | {peak / 1e12:.2f} "
          f"| {achieved / peak:.1%} |")


if __name__ == "__main__":
    main()
