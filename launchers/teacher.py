"""`embedforge teacher score`: a D2LLM teacher scores a pair dataset into a scored dataset.

Runs in this process, as one rank of torchrun (each rank takes every world-th pending shard; with
--tp / --pp each group of tp x pp ranks holds one teacher as megatron stages), or on a Ray cluster (`--ray local` starts one here, `--ray auto` / `--ray ray://HOST:PORT` joins one). A
rerun resumes: shards already scored are kept.
"""

from __future__ import annotations

import argparse
import json
import os

from launchers.cli_format import examples


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("teacher", help="D2LLM teacher: score (query, passage) pairs with yes/no logits")
    sub = p.add_subparsers(dest="teacher_command", required=True)
    s = sub.add_parser("score", help="score a pair dataset (positives, hard negatives, in-batch pairs)",
                       description="Score every pair D2LLM training reads into a scored dataset, resumably.",
                       epilog=examples("embedforge teacher score --model runs/d2llm-quickstart/teacher/00-teacher/final "
                                       "--input data/pairs-mined --output data/scored",
                                       "embedforge teacher score --model asset:smollm2-135m-instruct --input data/pairs "
                                       "--output data/scored --ray local --workers 2",
                                       "torchrun --nproc-per-node 8 -- embedforge teacher score --model /models/big "
                                       "--input data/pairs --output data/scored --tp 4 --dtype bfloat16"))
    s.add_argument("--model", required=True, help="teacher LLM: HF folder, .gguf file or asset:NAME")
    s.add_argument("--input", required=True, metavar="DIR", help="pair dataset (embedforge data build --kind pair)")
    s.add_argument("--output", required=True, metavar="DIR", help="scored dataset to write (resumed if present)")
    s.add_argument("--group-size", type=int, default=8, help="queries per planned batch (in-batch pairs scored)")
    s.add_argument("--batch-size", type=int, default=16, help="pairs per teacher forward")
    s.add_argument("--features", action="store_true", help="also store teacher features (feature imitation)")
    s.add_argument("--symmetric-tasks", default=None,
                   help="comma-separated tasks scored with the symmetric template (default: a fine-tuned teacher's "
                        "own, else none)")
    s.add_argument("--prompt", default=None, metavar="FILE",
                   help="YAML/JSON prompt: templates, yes/no words, chat, answer_prefix, max_length (e.g. an LLM "
                        "reranker's own format); default: a fine-tuned teacher folder's own prompt, else the built-in")
    s.add_argument("--yes", default=None, help="the positive answer word (one token; default: the prompt's, 'yes')")
    s.add_argument("--no", default=None, help="the negative answer word (one token; default: the prompt's, 'no')")
    s.add_argument("--chat", default=None, action=argparse.BooleanOptionalAction,
                   help="wrap the prompt in the tokenizer's chat template (default: the prompt's, on)")
    s.add_argument("--max-length", type=int, default=None,
                   help="prompt tokens at most, passage truncated first (default: the prompt's, 512)")
    s.add_argument("--ray", default=None, metavar="ADDRESS", help="run on Ray: local, auto or ray://HOST:PORT")
    s.add_argument("--workers", type=int, default=2, help="Ray actors (each loads the teacher once)")
    s.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each Ray actor requests")
    s.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each Ray actor requests")
    s.add_argument("--device", default="auto",
                   help="auto | cpu | cuda; auto: the process's GPU when CUDA is present")
    s.add_argument("--dtype", default="float32", help="float32 | bfloat16: the teacher's weights")
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per teacher (megatron stages; torchrun)")
    s.add_argument("--pp", type=int, default=1, help="pipeline stages per teacher (megatron stages; torchrun)")
    s.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from toolkit.distributed.parallel_dims import init_distributed
    from toolkit.errors import InputError
    from toolkit.teacher.job import ScoreJob, finish, pending_shards, run_local, teacher_settings

    symmetric = [t for t in args.symmetric_tasks.split(",") if t] if args.symmetric_tasks is not None else None
    prompt, symmetric = teacher_settings(args.model, args.prompt, symmetric, yes=args.yes, no=args.no,
                                         chat=args.chat, max_length=args.max_length)
    job = ScoreJob(model=args.model, input=args.input, output=args.output, group_size=args.group_size,
                   batch_size=args.batch_size, features=args.features, prompt=prompt,
                   symmetric_tasks=symmetric, dtype=args.dtype,
                   device=args.device, tp=args.tp, pp=args.pp)
    if args.ray and job.model_parallel:
        raise InputError("teacher score --ray with --tp / --pp: a Ray scoring worker is one process; run a "
                         "model-parallel teacher under torchrun (or `embedforge submit slurm`)")
    if args.ray:
        from cluster.scoring import run_ray

        summary = run_ray(job, address=None if args.ray == "local" else args.ray, workers=args.workers,
                          cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker)
        print(json.dumps(summary))
        return 0 if summary["manifest"] else 1
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if job.model_parallel:  # the stages talk: torchrun's ranks join one process group
        job.dims(world, rank)  # refused before any rank waits for the others
        rank, world = init_distributed()
    done = run_local(job, rank, world)
    manifest = finish(job, pending_shards(job)[0])
    print(f"rank {rank}: scored {len(done)} shard(s); "
          + (f"dataset complete: {manifest}" if manifest else "other shards are still being scored"))
    return 0
