#!/usr/bin/env python
"""Memory per rank vs layout: what each rank of the megatron engine actually holds while it builds,
steps, saves and exports, for real weights at 1 to 4 ranks.

    .venv/bin/python bench/memory_layouts.py [--model asset:smollm2-135m-instruct] [--lora]
        [--layouts 1 pp2 dp2 tp3 pp2-dp2 pp4] [--batch-size 4] [--seq-len 64] [--steps 3]

Each layout runs one MNTP stage (real nlp-corpus sentences, checkpoint at step 2, the stage's export
at the end) through `torchrun` and the real trainer; `bench/phase_worker.py` reports every rank's
peak heap (glibc in-use bytes: what tensors hold) and peak RSS per phase. The table gives them in
MB and as a multiple of the rank's own module ("own"): a rank that ever held the whole model shows
a multiple near the layout's rank count. SmolLM2-135M has 3 KV heads, so its tensor-parallel layout
is TP3 (TP2 / TP4 do not divide its heads).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = ROOT / ".venv" / "bin" / "python"
LAYOUTS = {  # name: (ranks, overrides)
    "1": (1, []),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2": (2, []),
    "tp3": (3, ["parallel.tp=3"]),
    "pp2-dp2": (4, ["parallel.pp=2"]),
    "pp4": (4, ["parallel.pp=4", "parallel.first_stage_layers=6", "parallel.last_stage_layers=6"]),
}
PHASES = ("build", "step", "save", "export")


def run_layout(name: str, cfg: Path, work: Path) -> dict:
    nproc, overrides = LAYOUTS[name]
    report = work / f"report-{name}"
    cmd = [str(PY), "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "bench" / "phase_worker.py"), str(cfg), f"output_dir={work / ('run-' + name)}",
           "engine=megatron", "checkpoint.every_steps=2", *overrides, "--report", str(report)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    ranks = [json.loads(f.read_text()) for f in sorted(report.glob("rank-*.json"))] if report.is_dir() else []
    if proc.returncode != 0 or len(ranks) != nproc:
        tail = [line for line in proc.stderr.strip().splitlines() if "Error" in line or "error:" in line][-1:]
        return {"layout": name, "error": (tail or ["failed"])[0][:200]}
    return {"layout": name, "ranks": sorted(ranks, key=lambda r: r["rank"])}


def table(results: list[dict], model_mb: float) -> str:
    rows = ["| layout | rank | own module MB | " + " | ".join(f"{p} heap MB (x own)" for p in PHASES)
            + " | peak RSS MB (any phase) |", "|---|---|---|" + "---|" * len(PHASES) + "---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['layout']} | error: {r['error']} |" + " |" * (len(PHASES) + 2))
            continue
        for rank in r["ranks"]:
            own = rank["own_shard_mb"]
            cells = []
            for p in PHASES:
                ph = rank["phases"].get(p)
                cells.append("-" if ph is None else f"{ph['peak_heap_mb']:,.0f} ({ph['peak_heap_mb'] / own:.1f})")
            rss = max((ph["peak_rss_mb"] for ph in rank["phases"].values()), default=0.0)
            rows.append(f"| {r['layout']} | {rank['rank']} | {own:,.0f} | " + " | ".join(cells) + f" | {rss:,.0f} |")
    return f"whole model (fp32 parameters): {model_mb:,.0f} MB\n\n" + "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="asset:smollm2-135m-instruct")
    p.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    p.add_argument("--batch-size", type=int, default=4, help="per DP rank")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    args = p.parse_args()
    knobs = argparse.Namespace(workload="mntp", batch_size=args.batch_size, seq_len=args.seq_len, lora=args.lora,
                               precision="fp32", warmup_steps=0, steps=args.steps, model=args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = recipe(knobs, work)
        results = []
        for name in args.layouts:
            results.append(run_layout(name, cfg, work))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    single = next((r for r in results if r["layout"] == "1" and "error" not in r), None)
    model_mb = single["ranks"][0]["own_shard_mb"] if single else float("nan")
    print(f"\n{args.model}, MNTP ({'LoRA' if args.lora else 'full fine-tuning'}, fp32), batch {args.batch_size} x "
          f"{args.seq_len} tokens per DP rank, {args.steps} steps, checkpoint at step 2, export at the end\n")
    print(table(results, model_mb))


if __name__ == "__main__":
    main()
