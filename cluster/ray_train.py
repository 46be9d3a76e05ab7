"""The Ray driver of a training run: `python -m cluster.ray_train CONFIG [overrides] --workers N ...`.

It is the entrypoint of the Ray job `embedforge submit ray` submits (and of `embedforge submit slurm
--launch ray`): it joins the cluster it runs in (`ray.init(address="auto")`), trains the recipe on a
worker group with restarts (`cluster.ray_group.run_training`) and exits like `embedforge train`:
0 when every stage finished, 3 when the run stopped with a checkpoint (preemption; resubmit to
continue), 2 for a bad recipe, 1 when the failures used up `--max-failures`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from toolkit.config import load_config
from toolkit.errors import EmbedforgeError

EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cluster.ray_train",
                                description="Train a recipe on a Ray worker group (one actor per rank), restarting "
                                            "from the newest complete checkpoint when a worker fails.")
    p.add_argument("config", help="YAML recipe (relative to --workdir)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--workers", type=int, required=True, help="ranks (one actor each)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=int, default=0, choices=[0, 1])
    p.add_argument("--max-failures", type=int, default=3, help="group restarts allowed before giving up")
    p.add_argument("--strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                   help="placement group strategy")
    p.add_argument("--resume", default="auto", help="auto (newest complete step-N) or never (first attempt only)")
    p.add_argument("--workdir", default=None, help="cwd of the driver and the actors (default: this one)")
    p.add_argument("--address", default="auto", help="Ray cluster to join (default: the one this job runs in)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.workdir:
        os.chdir(args.workdir)

    try:
        load_config(args.config, args.overrides)
    except EmbedforgeError as exc:
        print(f"cluster.ray_train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    import ray  # lazy: ray, only once the recipe is known to be valid

    from cluster.ray_group import TrainingFailed, run_training  # lazy: imports ray

    ray.init(address=args.address)
    try:
        report = run_training(args.config, args.overrides, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                              gpus_per_worker=args.gpus_per_worker, max_failures=args.max_failures,
                              strategy=args.strategy, resume=args.resume, workdir=os.getcwd())
    except TrainingFailed as exc:
        print(f"cluster.ray_train: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except EmbedforgeError as exc:  # --workers, --max-failures, ...
        print(f"cluster.ray_train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        ray.shutdown()
    for s in report.stages:
        state = f"final model: {s['final_dir']}" if s["final_dir"] else f"stopped at step {s['steps_done']} (checkpoint saved)"
        print(f"stage {s['stage']}: {state}")
    if report.failures:
        print(f"recovered from {len(report.failures)} failure(s): " + " | ".join(report.failures))
    return 0 if report.completed else EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
