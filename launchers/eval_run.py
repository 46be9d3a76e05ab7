"""`embedforge eval run`: models x tasks through mteb (local offline tasks and real MTEB tasks), cached.

    embedforge eval run --models runs/qs/01-simcse/final runs/qs/01-simcse/step-40 minilm \
        --tasks EmbedforgeRTSentiment STSBenchmark --cache mteb-results --instructions my.json

Results are mteb's ResultCache files under --cache (one folder per model and checkpoint), so rerunning
computes only what is missing. Under torchrun (WORLD_SIZE > 1) every rank runs the same command and
encoding is sharded across the ranks; rank 0 prints and writes. With --tp / --pp each group of
tp x pp ranks holds one encoder as megatron stages (a model no single device holds) and the texts
are sharded over the groups.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from launchers.cli_format import examples
from toolkit.errors import InputError


def split_values(values: list[str] | None) -> list[str] | None:
    """Space- or comma-separated lists ("--tasks A,B C")."""
    out = [v.strip() for item in values or () for v in item.split(",") if v.strip()]
    return out or None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("run", help="evaluate models on mteb tasks (local offline or real MTEB), cached",
                              description="Evaluate encoders through mteb.evaluate with a result cache (only-missing). "
                                          "Progress (model, task, texts encoded, elapsed) goes to stderr.",
                              epilog=examples("embedforge eval run --models runs/qs/01-simcse/final minilm",
                                              "embedforge eval run --models my-encoder --tasks rt-sentiment "
                                              "wordnet-retrieval --task-size rt-sentiment.n_test=200 "
                                              "wordnet-retrieval.n_queries=100",
                                              "embedforge eval run --models my-encoder --tasks STSBenchmark --cache "
                                              "mteb-results --output r.json"))
    p.add_argument("--models", nargs="+", required=True,
                   help="encoder folders (a stage's final/, an export), step-N/ checkpoints, or 'minilm'")
    p.add_argument("--tasks", nargs="*", default=None,
                   help="task names: local (EmbedforgeRTSentiment, ..., or rt-sentiment) or any mteb task (STSBenchmark)")
    p.add_argument("--task-types", nargs="*", default=None, help="filter: Classification Retrieval STS PairClassification ...")
    p.add_argument("--languages", nargs="*", default=None, help="filter: ISO 639-3 codes, e.g. eng")
    p.add_argument("--benchmark", default=None, help='an mteb benchmark, e.g. "MTEB(eng, v2)"')
    p.add_argument("--no-local", action="store_true", help="without names/benchmark, select from mteb's registry "
                   "instead of the local tasks")
    p.add_argument("--cache", default=None, metavar="DIR", help="mteb result cache (default: $EMBEDFORGE_CACHE/mteb-results)")
    p.add_argument("--instructions", default=None, metavar="FILE", help="JSON task -> instruction overrides")
    p.add_argument("--task-size", nargs="+", action="extend", default=[], metavar="TASK.FIELD=N", help=TASK_SIZE_HELP)
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per model (megatron stages; torchrun)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages per model (megatron stages; torchrun)")
    p.add_argument("--overwrite", default="only-missing", choices=["only-missing", "always", "never", "only-cache"],
                   help="mteb's overwrite strategy for cached results")
    p.add_argument("--output", default=None, metavar="FILE", help="results JSON (default: <cache>/eval_run.json)")
    p.set_defaults(func=run)
    return p


TASK_SIZE_HELP = ("size a local task (a new data revision in the cache, never mixed with other sizes): "
                  "EmbedforgeRTSentiment / rt-sentiment: n_train, n_test; EmbedforgeWordNetRetrieval / "
                  "wordnet-retrieval: n_queries, max_family; EmbedforgeWordNetSameSense / wordnet-same-sense: "
                  "n_pairs; speech-continuation: half_words, min_words; debate-party: min_words; "
                  "rt-movie-clustering: n_movies, per_movie")


def parse_task_sizes(items: list[str]) -> dict[str, dict[str, int]]:
    """`rt-sentiment.n_test=200` items -> {"rt-sentiment": {"n_test": 200}}."""
    sizes: dict[str, dict[str, int]] = {}
    for item in items:
        key, _, value = item.partition("=")
        task, _, field = key.rpartition(".")
        if not task or not field or not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"--task-size {item}: expected TASK.FIELD=N with N >= 1, e.g. rt-sentiment.n_test=200")
        sizes.setdefault(task.strip(), {})[field.strip()] = int(value)
    return sizes


def _init_distributed() -> tuple[int, str]:
    """(rank, device): a process group when launched by torchrun with several ranks."""
    import torch

    from toolkit.distributed.parallel_dims import init_distributed

    rank, _ = init_distributed()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, f"cuda:{local}" if torch.cuda.is_available() else "cpu"


def format_table(rows: list[dict], tasks: list[dict]) -> str:
    """Markdown: one row per model, the main score of each task x100 (blank where it failed)."""
    head = "| model | revision | " + " | ".join(f"{t['name']} ({t['main_score']})" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for r in rows:
        cells = [f"{100 * r['scores'][t['name']]:.2f}" if t["name"] in r["scores"] else "" for t in tasks]
        lines.append(f"| {r['spec']} | {r['revision']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from toolkit.assets import cache_dir
    from toolkit.eval.mteb_model import Instructions
    from toolkit.eval.mteb_run import evaluate, load_model, select_tasks
    from toolkit.eval.progress import EncodeProgress

    rank, device = _init_distributed()
    cache = Path(args.cache) if args.cache else cache_dir() / "mteb-results"
    tasks = select_tasks(split_values(args.tasks), split_values(args.task_types), split_values(args.languages),
                         args.benchmark, local=not args.no_local, sizes=parse_task_sizes(args.task_size))
    instructions = Instructions(args.instructions)
    task_info = [{"name": t.metadata.name, "type": t.metadata.type, "main_score": t.metadata.main_score} for t in tasks]
    rows = []
    for spec in args.models:
        model = load_model(spec, instructions=instructions, batch_size=args.batch_size, device=device, tp=args.tp,
                           pp=args.pp)
        model.progress = EncodeProgress(spec, quiet=rank != 0)  # every rank splits its encoding alike
        t0 = time.perf_counter()
        scores = evaluate(model, tasks, cache, args.overwrite, batch_size=args.batch_size)
        meta = model.mteb_model_meta
        rows.append({"spec": spec, "name": meta.name, "revision": meta.revision, "experiment": meta.experiment_name,
                     "scores": scores, "computed": model.loaded, "seconds": round(time.perf_counter() - t0, 2)})
        if rank == 0:
            print(f"{spec}: {'evaluated' if model.loaded else 'all cached'} in {rows[-1]['seconds']} s", flush=True)
        del model
    if rank == 0:
        print(format_table(rows, task_info))
        output = Path(args.output) if args.output else cache / "eval_run.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        metric = {t["name"]: t["main_score"] for t in task_info}
        flat = [{"model": r["spec"], "task": task, "score": 100 * score, "metric": metric[task]}
                for r in rows for task, score in r["scores"].items()]  # `eval compare` reads these rows
        output.write_text(json.dumps({"rows": flat, "tasks": task_info, "models": rows, "cache": str(cache),
                                      "instructions": args.instructions}, indent=2) + "\n")
        print(f"results: {output}")
    return 0
