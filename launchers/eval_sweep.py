"""`embedforge eval sweep` and `embedforge eval compare`.

    embedforge eval sweep --models minilm --checkpoints 'runs/qs/*/step-*' --tasks rt-sentiment \
        wordnet-retrieval --output sweeps/qs [--ray local | --ray HOST:PORT | --slurm --partition cpu]

A sweep is one job per (model or checkpoint, task group); jobs run in this process, as Ray tasks on
a local or remote cluster, or as a SLURM array (plus a dependent job that writes the report). Every
job writes through mteb's result cache (`--cache`, default `<output>/cache`), so an interrupted sweep
rerun computes only what is missing, and the report (results.csv / .md / .json, score_vs_step.png,
heatmap.png) is rebuilt from the cache. With --tp / --pp each job's model runs as megatron stages on a
group of tp x pp ranks: run the sweep under torchrun, or with --slurm, where each array task runs torchrun.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from pathlib import Path

from launchers.cli_format import examples
from launchers.eval_run import TASK_SIZE_HELP, parse_task_sizes, split_values
from toolkit.errors import InputError


def add_parsers(subparsers) -> None:
    s = subparsers.add_parser("sweep", help="evaluate models and checkpoints x tasks in parallel; table + plots",
                              description="Fan out (model/checkpoint, task group) jobs locally, on Ray or as a "
                                          "SLURM array; gather a table (CSV + Markdown) and plots (PNG).",
                              epilog=examples("embedforge eval sweep --checkpoints 'runs/qs/*/step-*' minilm --output sweep",
                                              "embedforge eval sweep --models my-encoder minilm --tasks STSBenchmark "
                                              "--ray local --output sweep",
                                              "embedforge eval sweep --checkpoints 'runs/l8b/*/step-*' --slurm "
                                              "--partition gpu --gpus-per-job 1 --output /shared/sweep"))
    s.add_argument("--models", nargs="*", default=[], help="encoder folders, step-N/ checkpoints or 'minilm'")
    s.add_argument("--checkpoints", nargs="*", default=[], metavar="PATH_OR_GLOB",
                   help="checkpoints of runs, e.g. 'runs/qs/*/step-*' (quote globs): placed on the training-step axis")
    s.add_argument("--tasks", nargs="*", default=None, help="task names (local or mteb); default: the local tasks")
    s.add_argument("--task-types", nargs="*", default=None, help="filter: Classification Retrieval STS ...")
    s.add_argument("--languages", nargs="*", default=None, help="filter: ISO 639-3 codes, e.g. eng")
    s.add_argument("--benchmark", default=None, help='an mteb benchmark, e.g. "MTEB(eng, v2)"')
    s.add_argument("--task-size", nargs="+", action="extend", default=[], metavar="TASK.FIELD=N", help=TASK_SIZE_HELP)
    s.add_argument("--tasks-per-job", type=int, default=1, help="tasks evaluated by one job")
    s.add_argument("--output", required=True, metavar="DIR", help="report folder (jobs.json, results.*, *.png)")
    s.add_argument("--cache", default=None, metavar="DIR", help="mteb result cache (default: <output>/cache)")
    s.add_argument("--instructions", default=None, metavar="FILE", help="JSON task -> instruction overrides")
    s.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    s.add_argument("--ray", default=None, metavar="ADDRESS", help="run jobs as Ray tasks: local, auto or HOST:PORT")
    s.add_argument("--cpus-per-job", type=float, default=1.0, help="CPUs each Ray task / SLURM array task requests")
    s.add_argument("--gpus-per-job", type=float, default=0.0,
                   help="GPUs each Ray task / SLURM array task requests (SLURM: a whole number)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda, resolved where each job runs")
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per model (megatron stages): run the "
                                                     "sweep under torchrun, or --slurm (each array task runs torchrun)")
    s.add_argument("--pp", type=int, default=1, help="pipeline stages per model (as --tp)")
    s.add_argument("--slurm", action="store_true", help="submit the jobs as a SLURM array (+ a report job)")
    s.add_argument("--partition", default=None, help="SLURM partition")
    s.add_argument("--time", default=None, help="SLURM: wall-time limit of each array task")
    s.add_argument("--account", default=None, help="SLURM account")
    s.add_argument("--max-parallel", type=int, default=0, help="SLURM: array tasks running at once (0: no limit)")
    s.add_argument("--report-only", action="store_true", help="write the report from the cache, computing nothing")
    s.add_argument("--jobs-file", default=None, help=argparse.SUPPRESS)  # a planned sweep (SLURM array tasks)
    s.add_argument("--job-index", type=int, default=None, help=argparse.SUPPRESS)
    s.set_defaults(func=run_sweep)

    c = subparsers.add_parser("compare", help="per-task deltas of two results files; exit 1 on a regression",
                              description="Compare NEW against BASELINE (files of `eval run --output` or `eval "
                                          "sweep`); exit 1 when a task drops more than --threshold points.",
                              epilog=examples("embedforge eval compare baseline.json new.json --threshold 0.5"))
    c.add_argument("baseline", help="results JSON")
    c.add_argument("new", help="results JSON")
    c.add_argument("--threshold", type=float, default=1.0, help="allowed drop, in score points (x100 scale)")
    c.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from toolkit.eval.compare import compare_files

    text, ok = compare_files(Path(args.baseline), Path(args.new), args.threshold)
    print(text, end="")
    return 0 if ok else 1


def run_sweep(args: argparse.Namespace) -> int:
    from toolkit.distributed.parallel_dims import init_distributed
    from toolkit.eval.mteb_run import run_job
    from toolkit.eval.sweep import expand_models, plan_jobs, read_jobs, write_jobs
    from toolkit.eval.sweep_report import write_report

    model_parallel = args.tp * args.pp > 1 and not args.report_only
    if model_parallel and args.ray:
        raise InputError(f"eval sweep --ray with --tp {args.tp} / --pp {args.pp}: a job's model-parallel group runs "
                         "under torchrun; use --slurm (each array task runs torchrun) or run the sweep under torchrun")
    rank, _ = init_distributed()  # under torchrun (--tp / --pp): every rank runs each job, rank 0 reports
    sizes = parse_task_sizes(args.task_size)
    output = Path(args.output).resolve()
    cache = Path(args.cache).resolve() if args.cache else output / "cache"
    if args.jobs_file:
        jobs = read_jobs(Path(args.jobs_file))
    else:
        from toolkit.eval.mteb_run import select_tasks

        models = expand_models(args.models, args.checkpoints)
        if not models:
            raise InputError("nothing to evaluate: give --models and/or --checkpoints")
        tasks = select_tasks(split_values(args.tasks), split_values(args.task_types), split_values(args.languages),
                             args.benchmark, sizes=sizes)
        jobs = plan_jobs(models, [t.metadata.name for t in tasks], args.tasks_per_job)
        if rank == 0:
            write_jobs(jobs, output / "jobs.json")
    parallel = {"tp": args.tp, "pp": args.pp} if model_parallel else {}
    runner = functools.partial(run_job, cache_dir=cache, instructions=args.instructions, batch_size=args.batch_size,
                               cache_only=args.report_only, device=args.device, sizes=sizes, **parallel)
    if args.job_index is not None:  # one SLURM array task
        if not 0 <= args.job_index < len(jobs):
            raise InputError(f"--job-index {args.job_index}: the sweep has {len(jobs)} jobs")
        runner(jobs[args.job_index])
        return 0
    if args.slurm:
        return _submit_array(args, len(jobs), output, cache)
    if rank == 0:
        print(f"sweep: {len(jobs)} job(s) over {len({j.model.label for j in jobs})} model(s); cache {cache}", flush=True)
    if args.ray:
        from cluster.eval_sweep import run_ray

        rows = run_ray(jobs, runner, address=None if args.ray == "local" else args.ray, cpus_per_job=args.cpus_per_job,
                       gpus_per_job=args.gpus_per_job)
    else:
        rows = [row for job in jobs for row in runner(job)]
    if rank != 0:
        return 0  # rank 0 writes the report
    if not rows:
        raise InputError(f"{cache}: no results to report (did every job fail? see the logs in {output / 'slurm'})")
    missing = sum(len(j.tasks) for j in jobs) - len(rows)
    if missing:
        print(f"sweep: {missing} (model, task) result(s) missing: failed or not run; rerun the sweep to compute them")
    files = write_report(rows, output)
    print(files["markdown"].read_text())
    print("\n".join(f"{kind}: {path}" for kind, path in files.items()))
    return 0


def _submit_array(args: argparse.Namespace, n_jobs: int, output: Path, cache: Path) -> int:
    """The planned jobs as a SLURM array, then a report job once they all ended (it recomputes nothing)."""
    from launchers.slurm import submit_array

    common = ["--jobs-file", str(output / "jobs.json"), "--output", str(output), "--cache", str(cache),
              "--batch-size", str(args.batch_size), "--device", args.device] + (
        ["--task-size", *args.task_size] if args.task_size else []) + (
        ["--instructions", args.instructions] if args.instructions else [])
    if args.gpus_per_job != int(args.gpus_per_job):
        raise InputError(f"--gpus-per-job {args.gpus_per_job:g}: a SLURM array task takes whole GPUs")
    base = [sys.executable, "-m", "launchers.cli", "eval", "sweep", *common]
    task = [*base, "--job-index"]
    group = args.tp * args.pp
    if group > 1:  # each array task: one model-parallel group on its node, under torchrun
        task = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={group}",
                "-m", "launchers.cli", "eval", "sweep", *common, "--tp", str(args.tp), "--pp", str(args.pp),
                "--job-index"]
        if args.gpus_per_job and args.gpus_per_job < group:
            raise InputError(f"--gpus-per-job {args.gpus_per_job:g} < --tp {args.tp} x --pp {args.pp}: each rank of a "
                             "job's group takes a GPU")
    ids = submit_array(name="ef-eval-sweep", n_tasks=n_jobs, task_command=task,
                       report_command=[*base, "--report-only"], log_dir=output / "slurm",
                       cpus=max(1, int(args.cpus_per_job), group),
                       gpus=int(args.gpus_per_job),
                       partition=args.partition, time=args.time, account=args.account, max_parallel=args.max_parallel)
    print(f"submitted array {ids[0]} ({n_jobs} jobs) and report job {ids[1]}; report in {output} "
          f"(rerun: {shlex.join(base)})")
    return 0
