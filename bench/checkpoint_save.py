"""Checkpoint saves at DP2 (megatron engine, torchrun, gloo on CPU): how long the loop is held, and
who writes the bytes.

Runs the same full fine-tuning MNTP recipe (real SmolLM2-135M weights by default: weights + Adam's two
moments, ~1.6 GB a step) three times, each in its own torchrun: synchronous save with DP replica 0
writing everything (`checkpoint.parallel_save=false`, the old behaviour), synchronous fully parallel
save, and async fully parallel save. The trainer logs each save on rank 0 ("committed X s after the
save began (sync|async; the loop was held Y s)"); the bytes each rank wrote are read from the step's
files (torch_dist names them `__<rank>_<n>.distcp`); "run wall" is the whole torchrun (model load,
6 steps, saves, export of final/). An async save's completion is noticed at a step boundary, so its
"start to COMPLETE" is rounded up to one. Prints a markdown table.

    PYTHONPATH=. .venv/bin/python bench/checkpoint_save.py [--model PATH] [--steps 6] [--every 2]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import prepare  # noqa: E402

SAVE_LINE = re.compile(r"step-(\d+): committed ([\d.]+) s after the save began \((sync|async); the loop was held ([\d.]+) s\)")
MODES = {  # name: overrides
    "sync, replica 0 writes": ["checkpoint.async_save=false", "checkpoint.parallel_save=false"],
    "sync, fully parallel": ["checkpoint.async_save=false", "checkpoint.parallel_save=true"],
    "async, fully parallel": ["checkpoint.async_save=true", "checkpoint.parallel_save=true"],
}


def recipe(work: Path, model: str, steps: int, every: int) -> Path:
    model_dir, texts, _ = prepare(model, 256, work)
    shards = work / "text-shards"
    subprocess.run([str(Path(sys.executable).parent / "embedforge"), "data", "build", "--input", str(texts),
                    "--output", str(shards), "--kind", "text", "--shard-samples", "32"], check=True, capture_output=True)
    cfg = {
        "output_dir": "unset", "seed": 5, "engine": "megatron",
        "model": {"path": str(model_dir), "max_length": 64},
        "pooling": {"mode": "mean"},
        "stages": [{"name": "mntp", "steps": steps, "lora": {"enabled": False},
                    "data": {"path": str(shards), "batch_size": 4, "max_length": 64, "mode": "resampled"},
                    "objective": {"kind": "mntp", "mntp": {"mask_probability": 0.2, "mask_token": "eos"}},
                    "optimizer": {"lr": 1e-5}}],
        "checkpoint": {"every_steps": every, "keep_last": 1},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cfg: Path, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(Path(sys.executable).parent / "embedforge"), "train", str(cfg), f"output_dir={out}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    saves = [(float(m.group(2)), float(m.group(4))) for m in SAVE_LINE.finditer(proc.stderr)]
    step_dir = max((out / "00-mntp").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    per_rank = {0: 0, 1: 0}
    for f in (step_dir / "megatron").glob("__*_*.distcp"):
        per_rank[int(f.name.split("_")[2])] += f.stat().st_size
    total = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
    return {"saves": len(saves), "held": max(h for _, h in saves), "committed": max(c for c, _ in saves),
            "held_mean": sum(h for _, h in saves) / len(saves), "rank0": per_rank[0], "rank1": per_rank[1],
            "total": total, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="asset:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    try:
        cfg = recipe(work, args.model, args.steps, args.every)
        rows = ["| save | saves | loop held, mean / max s | start to COMPLETE, max s | rank 0 MB | rank 1 MB "
                "| step MB | run wall s |", "|---|---|---|---|---|---|---|---|"]
        for name, overrides in MODES.items():
            out = work / re.sub(r"\W+", "-", name)
            r = run(cfg, out, overrides)
            rows.append(f"| {name} | {r['saves']} | {r['held_mean']:.2f} / {r['held']:.2f} | {r['committed']:.2f} "
                        f"| {r['rank0'] / 2**20:,.0f} | {r['rank1'] / 2**20:,.0f} | {r['total'] / 2**20:,.0f} | {r['wall']:.0f} |")
            shutil.rmtree(out, ignore_errors=True)
            print(rows[-1], flush=True)
        print("\n".join(rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
