"""Dry run vs planner, per sampled rank, for the scale presets at their documented layouts.

    PYTHONPATH=. .venv/bin/python bench/dry_run_vs_plan.py [configs/scale/llama3-8b.yaml ...] [key=value ...]

For each preset: its `# Plan:` command's --gpus / --gpu-mem / overrides, the planner (toolkit.planner)
and the dry run (toolkit.dry_run: the megatron engine's real modules of the first / middle / last
pipeline stage on the meta device, under a fake process group of the full world). Prints one
markdown table (GiB per GPU: dry run / plan, and the ratio of weights + grads + optimizer) and the
seconds each preset took; `key=value` overrides apply to every preset (after its own). Activations
are planned, not measured. No weights are read.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launchers.cli import build_parser  # noqa: E402
from toolkit.config import load_config  # noqa: E402
from toolkit.dry_run import COLUMNS, dry_run  # noqa: E402
from toolkit.planner import GIB, load_arch, plan_run  # noqa: E402

DEFAULT = ["configs/scale/llama3-8b.yaml", "configs/scale/llama3-70b.yaml", "configs/scale/llama3.1-405b.yaml"]


def plan_command(preset: Path) -> list[str]:
    """The `embedforge plan ...` arguments of the preset's `# Plan:` comment line."""
    line = next(x for x in preset.read_text().splitlines() if x.startswith("# Plan:"))
    return shlex.split(line.split("embedforge", 1)[1])


def main(presets: list[str], overrides: list[str]) -> None:
    header = ("| preset | layout | stage | rank (pp, role) | weights GiB dry / plan | grads GiB dry / plan "
              "| optimizer GiB dry / plan | w+g+o dry / plan | fits (dry w+g+o + planned act. + reserve) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    timings = []
    for name in presets:
        t0 = time.perf_counter()
        args = build_parser().parse_args(plan_command(ROOT / name))
        cfg = load_config(ROOT / args.config, args.overrides + overrides)
        arch, source = load_arch(cfg, ROOT / args.config, args.arch)
        plans = plan_run(cfg, arch, gpus=args.gpus, gpu_mem_gib=args.gpu_mem)
        p = plans[0]
        layout = f"{args.gpus} GPUs: TP{p.tp} PP{p.pp} DP{p.dp}"
        for r in dry_run(cfg, source, plans):
            cells = [f"{r.measured[c] / GIB:.3f} / {r.planned[c] / GIB:.3f}" for c in COLUMNS]
            fits = f"yes, {r.total / GIB:.1f} GiB" if r.fits else f"NO, {r.total / GIB:.1f} GiB"
            print(f"| {Path(name).stem} | {layout} | {r.stage} | {r.rank} ({r.pp_rank}, {r.role}) | "
                  + " | ".join(cells) + f" | {r.state_ratio:.4f} | {fits} |")
        timings.append((Path(name).stem, time.perf_counter() - t0))
    print()
    print("seconds per preset (plan + dry run of every sampled rank): "
          + ", ".join(f"{n} {s:.1f}" for n, s in timings))


if __name__ == "__main__":
    given = [a for a in sys.argv[1:] if a.endswith(".yaml")]
    main(given or DEFAULT, [a for a in sys.argv[1:] if not a.endswith(".yaml")])
