"""`embedforge plan CONFIG --gpus N --gpu-mem 80 [--dry-run]`: will this recipe fit, per GPU, before any job starts?

Prints one table per training stage (toolkit.planner); with `--dry-run` also the bytes of the engine's
real modules on sampled ranks (toolkit.dry_run) beside the plan. Exit code 0 when every stage fits
(and the dry run agrees with the plan within --tolerance), 1 when not, 2 for a config / layout error
(printed as one line by the CLI).
"""

from __future__ import annotations

import argparse

from launchers.cli_format import examples
from launchers.intermixed import take_overrides_anywhere


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="per-GPU memory plan of a recipe (parameters, grads, optimizer, activations)",
        description="Per-GPU memory of each stage of a recipe on N GPUs, without loading any weights. "
                    "Exit 0 if every stage fits, 1 if one does not.",
        epilog=examples("embedforge plan configs/scale/llama3-8b.yaml --gpus 8 --gpu-mem 80",
                        "embedforge plan configs/scale/llama3-70b.yaml --gpus 64 parallel.tp=8 parallel.pp=2 --dry-run",
                        "embedforge plan configs/quickstart.yaml --gpus 1 --gpu-mem 24 --stage simcse"))
    p.add_argument("config", help="YAML recipe, e.g. configs/scale/llama3-8b.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. parallel.tp=4")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs of the job")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB", help="memory per GPU in GiB")
    p.add_argument("--arch", default=None, metavar="FILE",
                   help="HF config.json of the model (default: model.path/config.json, or an imported asset: / .gguf "
                        "model's, else the recipe's '# arch:' line)")
    p.add_argument("--stage", default=None, help="plan only this stage (default: all)")
    p.add_argument("--negatives", type=int, default=1, help="hard negatives per supervised sample")
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="shard full-fine-tuning optimizer states over DP (megatron distributed optimizer)")
    p.add_argument("--reserve", type=float, default=3.0, metavar="GIB",
                   help="per-GPU reserve for CUDA context, NCCL buffers, fragmentation")
    p.add_argument("--dry-run", action="store_true",
                   help="also build the real megatron modules of the first / middle / last pipeline stage on the meta "
                        "device under a fake process group of N ranks and print their bytes beside the plan")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="--dry-run: largest relative difference from the plan that still passes")
    p.set_defaults(func=run)
    return take_overrides_anywhere(p)


def run(args: argparse.Namespace) -> int:
    from toolkit.config import load_config
    from toolkit.planner import format_plan, load_arch, plan_run

    overrides = [*args.overrides, *(["parallel.distributed_optimizer=true"] if args.distributed_optimizer else [])]
    cfg = load_config(args.config, overrides)  # the flag plans what the engine then runs
    arch, source = load_arch(cfg, args.config, args.arch)
    plans = plan_run(cfg, arch, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, stage=args.stage,
                     negatives=args.negatives, distributed_optimizer=args.distributed_optimizer,
                     reserve_gib=args.reserve)
    print(f"{args.config}: {arch.model_type}, {arch.num_layers} layers, hidden {arch.hidden_size} (arch: {source})")
    for plan in plans:
        print()
        print(format_plan(plan))
    ok = all(p.fits for p in plans)
    if args.dry_run:
        from toolkit.dry_run import dry_run, format_dry_run

        rows = dry_run(cfg, source, plans)
        print()
        print(format_dry_run(rows, args.gpus))
        off = [r for r in rows if not r.within(args.tolerance)]
        for r in off:
            print(f"  dry run differs from the plan by more than {args.tolerance:.0%}: stage {r.stage}, rank {r.rank} "
                  f"(pp {r.pp_rank}): " + ", ".join(f"{c} x{r.ratio(c):.3f}" for c in ("weights", "grads", "optimizer")))
        ok = ok and not off and all(r.fits for r in rows)
    return 0 if ok else 1
