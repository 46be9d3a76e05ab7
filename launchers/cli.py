"""`embedforge` command line: train, encode, export, eval, quickstart, data (build / verify / info), plan,
teacher (score), search (index / query), d2llm (quickstart).

Commands only parse arguments and call library entry points; an expected failure (an EmbedforgeError:
a bad config, a missing path, bad data, a wrong checkpoint) is printed as one clear line (exit code 2);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import NoReturn

from launchers import d2llm, evaluate, plan, search, submit, teacher
from launchers.cli_format import Parser, examples
from launchers.intermixed import take_overrides_anywhere
from launchers.recipes import QUICKSTART_RECIPE
from toolkit.errors import EmbedforgeError, InputError, MissingPathError, OutputError, PathExistsError

EXIT_USAGE = 2


def _cmd_train(args: argparse.Namespace) -> int:
    from toolkit.config import load_config
    from toolkit.run_layout import STOPPED
    from toolkit.train import preflight, run_recipe

    swallowed = [k for k in args.resume_with_changes if "=" in k]
    if swallowed:  # `--resume-with-changes a.b c.d=1`: the override would be read as a key and never applied
        raise InputError(f"--resume-with-changes {' '.join(swallowed)}: takes setting names, not overrides; put "
                         "key=value overrides before --resume-with-changes")
    cfg = load_config(args.config, args.overrides)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from toolkit.distributed.parallel_dims import ParallelDims

        preflight(cfg)  # a refused recipe fails here, once, before any rank starts
        ParallelDims.from_config(cfg.parallel, args.nproc, 0)  # a layout that cannot fit fails here, once
        return _relaunch_with_torchrun(args, Path(cfg.output_dir) / STOPPED)
    outcomes, finished, trainer = run_recipe(cfg, resume=args.resume, stop_after_steps=args.stop_after_steps or None,
                                             allow_changes=args.resume_with_changes)
    for o in outcomes if trainer.dims.is_logging_rank else ():
        state = f"final model: {o.final_dir}" if o.final_dir else f"stopped at step {o.steps_done} (checkpoint saved)"
        print(f"stage {o.name}: {state}")
    return 0 if finished else 3


def _relaunch_with_torchrun(args: argparse.Namespace, marker: Path) -> int:
    """`embedforge train CONFIG --nproc N`: the same command under torchrun, N ranks on this node.

    SIGINT (Ctrl-C) / SIGTERM / SIGUSR2 / SIGHUP sent to this process reach torchrun as SIGTERM (it passes
    to the ranks: they save and stop; SIGUSR2 would kill torchrun itself). torchrun runs in its own
    session, so a terminal's Ctrl-C reaches the ranks once, through it, and not also directly (two
    interrupts are a rank's "abort now"). The run's STOPPED marker says it stopped with a checkpoint:
    torchrun itself exits non-zero when it was signalled, after its ranks saved and ended."""
    import subprocess

    train = ["train", args.config, *args.overrides, "--resume", args.resume]
    if args.stop_after_steps:
        train += ["--stop-after-steps", str(args.stop_after_steps)]
    if args.resume_with_changes:
        train += ["--resume-with-changes", *args.resume_with_changes]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "launchers.rank", *(["-v"] if args.verbose else []), *train]
    marker.unlink(missing_ok=True)
    child = subprocess.Popen(cmd, start_new_session=True)
    signalled = []

    def stop(signum: int, _frame) -> None:
        signalled.append(signum)
        child.send_signal(signal.SIGTERM)

    forward = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP)}
    try:
        code = child.wait()
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)
    return 3 if marker.is_file() and (code == 0 or signalled) else code


def _read_texts(path: Path) -> list[str]:
    """Texts to encode from any input `data build` reads (JSONL "text", CSV / TSV / Parquet, plain text)."""
    from data_pipelines.records import BadRecord
    from data_pipelines.writer import open_input

    texts = []
    for n, record in open_input(str(path), "text", "text")[2]():
        if isinstance(record, BadRecord) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}:{n}: expected a record with a string field 'text' ({record})")
        texts.append(record["text"])
    if not texts:
        raise InputError(f"{path}: no texts to encode")
    return texts


def _cmd_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from toolkit.distributed.device import resolve_device
    from toolkit.models.encoder import Encoder
    from toolkit.models.folder import model_context
    from toolkit.models.loading import DTYPES

    if args.dtype not in DTYPES:
        raise InputError(f"--dtype {args.dtype}: must be one of {', '.join(DTYPES)}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.dim is not None and args.dim < 1:
        raise InputError(f"--dim {args.dim}: must be >= 1")
    if args.max_length is not None and args.max_length < 1:
        raise InputError(f"--max-length {args.max_length}: must be >= 1")
    device = resolve_device(args.device, field="--device")
    texts = _read_texts(Path(args.input))
    encoder = Encoder.from_pretrained(args.model, device=device, dtype=DTYPES[args.dtype])
    max_length = _encode_length(encoder, args.max_length, Path(args.model))
    truncated = int((encoder.token_lengths(texts, args.instruction) > max_length).sum())
    if truncated:
        print(f"embedforge encode: warning: {truncated} of {len(texts)} texts are longer than {max_length} tokens "
              f"and were truncated to {max_length} (--max-length; the model's context is "
              f"{model_context(encoder.backbone.config) or 'unknown'})", file=sys.stderr)
    emb = encoder.encode(texts, instruction=args.instruction, batch_size=args.batch_size, dim=args.dim,
                         normalize=not args.no_normalize, max_length=max_length)
    out = Path(args.output)
    tmp = out.with_name(out.name + ".tmp.npy")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp, emb)
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a failed or interrupted write leaves no .tmp.npy behind
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {out}")
    return 0


def _encode_length(encoder, requested: int | None, folder: Path) -> int:
    """--max-length, else the folder's recorded length; never above the model's context."""
    from toolkit.models.folder import model_context

    context = model_context(encoder.backbone.config)
    if requested is not None and context and requested > context:
        raise InputError(f"--max-length {requested}: longer than the model's context ({context} tokens, "
                         f"max_position_embeddings in {folder / 'config.json'})")
    return requested or encoder.spec.max_length


def _cmd_export(args: argparse.Namespace) -> int:
    from toolkit.engines.export import consolidate
    from toolkit.models.folder import SPEC_FILE, load_spec
    from toolkit.models.teacher_folder import is_teacher_folder

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise PathExistsError(f"{out}: already exists; pass --overwrite to replace it")
    if args.max_seq_length < 0:
        raise InputError(f"--max-seq-length {args.max_seq_length}: must be >= 1 (0: the recorded length)")
    consolidate(Path(args.checkpoint), out, args.max_seq_length)
    use = ("score pairs with `embedforge teacher score --model`" if is_teacher_folder(out)
           else f"load with Encoder.from_pretrained or SentenceTransformer; encodes at "
                f"{load_spec(out / SPEC_FILE).max_length} tokens")
    print(f"exported {args.checkpoint} -> {out} ({use})")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from launchers.quickstart import run_quickstart

    run_quickstart(Path(args.config), args.overrides, resume=args.resume)
    return 0


def _size(text: str) -> int:
    """`256MB`, `64K`, `1.5G`, `4096` -> bytes (binary multiples: 1K = 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not m or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256MB, 64K or 1G")
    return max(1, int(float(m[1]) * 1024 ** " KMGT".index(m[2].upper() or " ")))


def _cmd_data_build(args: argparse.Namespace) -> int:
    from data_pipelines.writer import build_shards

    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise MissingPathError(f"{args.tokenizer}: tokenizer folder not found (--tokenizer)")
    m = build_shards(args.input, args.output, args.kind, text_field=args.text_field, shard_bytes=args.shard_size,
                     shard_samples=args.shard_samples, tokenizer=args.tokenizer, max_chars=args.max_chars,
                     max_bad_fraction=args.max_bad_fraction, overwrite=args.overwrite)
    bad = sum(m.bad_records.values())
    kinds = f" ({', '.join(f'{k}={v}' for k, v in m.bad_records.items())})" if bad else ""
    print(f"built {args.output}: {len(m.shards)} shards, {m.num_samples} samples, {len(m.tasks())} tasks, "
          f"{bad} bad records skipped{kinds}")
    return 0


def _cmd_data_verify(args: argparse.Namespace) -> int:
    from data_pipelines.writer import verify_shards

    problems = verify_shards(args.folder)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{args.folder}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{args.folder}: all shards match the manifest")
    return 0


def _cmd_data_info(args: argparse.Namespace) -> int:
    from data_pipelines.manifest import load_manifest

    m = load_manifest(args.folder)
    print(f"kind: {m.kind}")
    print(f"samples: {m.num_samples}")
    print(f"shards: {len(m.shards)} ({sum(s.bytes for s in m.shards)} bytes)")
    print("url schemes: " + ", ".join(f"{k}={v}" for k, v in sorted(m.url_schemes().items())))
    print("tasks: " + ", ".join(f"{task}={n}" for task, n in m.tasks().items()))
    print(f"tokenizer: {m.tokenizer or '-'}")
    print("bad records: " + (", ".join(f"{k}={v}" for k, v in m.bad_records.items()) or "none"))
    print(f"source: {m.source or '-'} (built {m.created or '?'})")
    return 0


def _cmd_data_mine(args: argparse.Namespace) -> int:
    from data_pipelines.mining import mine

    encode = None
    if args.encoder:
        from toolkit.models.encoder import Encoder

        loaded = []  # the encoder loads on first use, after mine() has checked its arguments

        def encode(texts: list[str], instruction: str | None):
            if not loaded:
                loaded.append(Encoder.from_pretrained(args.encoder))
            return loaded[0].encode(texts, instruction=instruction, batch_size=args.batch_size)

    m = mine(args.input, args.output, method=args.method, k=args.k, corpus_dir=args.corpus, encode=encode,
             keep_existing=args.keep_existing, overwrite=args.overwrite)
    print(f"mined {args.k} {args.method} negatives for {m.num_samples} samples into {args.output} ({len(m.shards)} shards)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="embedforge", description="Train decoder LLMs into text encoders (LLM2Vec, D2LLM).",
               epilog=examples("embedforge quickstart", "embedforge train configs/quickstart.yaml stages.simcse.steps=200",
                               "embedforge COMMAND --help"))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run the stages of a YAML recipe",
                       description="Run a recipe's stages in order. Relative paths in the recipe (model.path, "
                                   "data.path, prompt_file) resolve against its folder; output_dir and overrides "
                                   "against the current directory.",
                       epilog=examples("embedforge train configs/quickstart.yaml stages.simcse.steps=200 output_dir=runs/my-run",
                                       "embedforge train configs/quickstart.yaml --resume auto --nproc 2",
                                       "embedforge train configs/quickstart.yaml stages.mntp.optimizer.lr=1e-5 "
                                       "--resume-with-changes stages.mntp.optimizer.lr"))
    t.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. stages.mntp.steps=10")
    t.add_argument("--resume", default="auto", help="auto (newest complete step-N), never, or a step-N path of "
                   "the stage to continue (anything else is refused)")
    t.add_argument("--resume-with-changes", nargs="+", default=[], metavar="KEY",
                   help="settings that may differ from the ones the checkpoints were written with, e.g. "
                   "stages.mntp.optimizer.lr (a key also allows the keys under it); every other change is refused")
    t.add_argument("--stop-after-steps", type=int, default=0, help="save a checkpoint and stop after N steps (time "
                   "slicing; 0: run to the end)")
    t.add_argument("--nproc", type=int, default=1, help="ranks on this machine (torchrun underneath); for several "
                   "nodes use `embedforge submit slurm|ray`")
    t.set_defaults(func=_cmd_train)
    take_overrides_anywhere(t)

    e = sub.add_parser("encode", help="embed texts with a trained encoder",
                       description="Embed every text of a file with an encoder folder into a float32 .npy matrix "
                                   "(one row per text, input order). Texts longer than --max-length tokens are "
                                   "truncated; a warning on stderr says how many.",
                       epilog=examples("embedforge encode --model runs/quickstart/01-simcse/final --input texts.txt "
                                       "--output emb.npy",
                                       "embedforge encode --model my-encoder --input docs.jsonl --output docs.npy "
                                       "--max-length 1024 --dim 256",
                                       "embedforge encode --model my-encoder --input queries.txt --output q.npy "
                                       "--instruction 'Given a question, retrieve passages that answer it'"))
    e.add_argument("--model", required=True, help="encoder folder (a stage's final/ or an export)")
    e.add_argument("--input", required=True, help="text file (one per line) or JSONL with a 'text' field")
    e.add_argument("--output", required=True, help="output .npy file")
    e.add_argument("--instruction", default=None, help="task instruction (attended to, not pooled)")
    e.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    e.add_argument("--max-length", type=int, default=None, metavar="TOKENS",
                   help="truncate each text (with its instruction) to this many tokens (default: the length the "
                        "folder records, its max_seq_length; at most the model's context)")
    e.add_argument("--dim", type=int, default=None, help="Matryoshka truncation to the first DIM components")
    e.add_argument("--no-normalize", action="store_true", help="keep raw (unnormalised) embeddings")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda; auto: the GPU when CUDA is present")
    e.add_argument("--dtype", default="float32",
                   help="float32 | bfloat16: the weights' dtype; embeddings are written as float32 either way")
    e.set_defaults(func=_cmd_encode)

    x = sub.add_parser("export", help="consolidate a run / stage / step-N checkpoint into a sentence-transformers folder",
                       description="Write an encoder folder (sentence-transformers + embedforge.json) from a run, a "
                                   "stage, its final/ or a step-N/ checkpoint. It encodes at the run's "
                                   "export.max_seq_length (auto: the model's context, at most 512 or model.max_length), not at the "
                                   "training crop.",
                       epilog=examples("embedforge export --checkpoint runs/quickstart --output my-encoder",
                                       "embedforge export --checkpoint runs/quickstart/01-simcse/step-50 --output my-encoder",
                                       "embedforge export --checkpoint runs/quickstart/01-simcse/final --output my-encoder "
                                       "--max-seq-length 2048 --overwrite"))
    x.add_argument("--checkpoint", required=True, help="run dir, stage dir, final/ or step-N/")
    x.add_argument("--output", required=True, help="folder to write")
    x.add_argument("--max-seq-length", type=int, default=0, metavar="TOKENS",
                   help="the length the folder encodes at (0: what the folder records, or for a step-N/ the run's "
                        "export.max_seq_length); at most the model's context")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    x.set_defaults(func=_cmd_export)

    q = sub.add_parser("quickstart", help="MNTP + SimCSE on real SmolLM2 weights, then the evaluation table",
                       description="Train the quickstart recipe (from any directory: the run goes to its output_dir "
                                   "under the current one) and compare every stage on held-out tasks.",
                       epilog=examples("embedforge quickstart",
                                       "embedforge quickstart stages.simcse.steps=40 output_dir=runs/qs-short",
                                       "embedforge quickstart --config my-recipe.yaml --resume never"))
    q.add_argument("--config", default=str(QUICKSTART_RECIPE), help="the recipe")
    q.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    q.add_argument("--resume", default="auto", help="auto (newest complete step-N), never, or a step-N path")
    q.set_defaults(func=_cmd_quickstart)
    take_overrides_anywhere(q)

    d = sub.add_parser("data", help="build, verify and inspect sharded (WebDataset) datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="validate records into tar shards + manifest.json",
                        description="Validate records (bad ones counted and skipped) into tar shards + manifest.json.",
                        epilog=examples("embedforge data build --input corpus.jsonl more.parquet --output data/corpus "
                                        "--kind text --shard-size 256MB",
                                        "embedforge data build --input pairs.tsv --output data/pairs --kind pair",
                                        "embedforge data build --input asset:nlp-corpus --output data/nlp --kind text "
                                        "--tokenizer runs/quickstart/01-simcse/final"))
    b.add_argument("--input", nargs="+", required=True, metavar="IN",
                   help=".jsonl, .csv, .tsv, .parquet, plain text (one per line, kind=text), asset:nlp-corpus or "
                        "asset:wordnet-pairs; several are concatenated in order")
    b.add_argument("--output", required=True, metavar="DIR",
                   help="folder to write (built aside, moved into place when complete)")
    b.add_argument("--kind", required=True, choices=["text", "pair", "scored"], help="sample kind")
    b.add_argument("--text-field", default="text", metavar="NAME", help="field holding the text (kind=text)")
    b.add_argument("--shard-size", type=_size, default=256 * 2**20, metavar="SIZE",
                   help="close a shard at about this size in bytes: 256MB, 64K, 1G")
    b.add_argument("--shard-samples", type=int, default=0, metavar="N",
                   help="close a shard at N samples (0: size only)")
    b.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder: also store token ids (tokens.npz)")
    b.add_argument("--max-chars", type=int, default=100_000, metavar="N", help="a longer text is a bad record (0: no limit; the loader's data.max_chars is also 100000)")
    b.add_argument("--max-bad-fraction", type=float, default=0.0, metavar="F",
                   help="fail if more than this fraction of records is bad (0: any bad record fails)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    b.set_defaults(func=_cmd_data_build)
    c = dsub.add_parser("verify", help="re-hash every shard against the manifest (exit 1 on a problem)")
    c.add_argument("folder", metavar="DIR", help="folder with manifest.json")
    c.set_defaults(func=_cmd_data_verify)
    i = dsub.add_parser("info", help="kind, samples, shards and tasks of a dataset")
    i.add_argument("folder", metavar="DIR", help="folder with manifest.json")
    i.set_defaults(func=_cmd_data_info)
    n = dsub.add_parser("mine", help="hard negatives by BM25 or a dense encoder into a new pair dataset",
                        description="Top-k passages per query (its positive excluded) as hard negatives.")
    n.add_argument("--input", required=True, metavar="DIR", help="pair dataset (query, positive[, negatives])")
    n.add_argument("--output", required=True, metavar="DIR", help="pair dataset to write")
    n.add_argument("--method", choices=["bm25", "dense"], default="bm25", help="how candidates are ranked")
    n.add_argument("--k", type=int, default=7, help="negatives per query")
    n.add_argument("--corpus", default=None, metavar="DIR", help="text dataset to mine from (default: the input's passages)")
    n.add_argument("--encoder", default=None, metavar="DIR", help="encoder folder (--method dense)")
    n.add_argument("--keep-existing", action="store_true", help="keep the input's negatives before the mined ones")
    n.add_argument("--batch-size", type=int, default=32, help="encoding batch (--method dense)")
    n.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    n.set_defaults(func=_cmd_data_mine)
    plan.add_parser(sub)
    teacher.add_parser(sub)
    search.add_parser(sub)
    d2llm.add_parser(sub)
    submit.add_parser(sub)
    evaluate.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except EmbedforgeError as exc:
        if args.verbose:
            raise
        print(f"embedforge {_command(args)}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C is expected: one line, no traceback (-v shows where it stopped)
        if args.verbose:
            raise
        print(f"embedforge {_command(args)}: interrupted; what it finished is kept (cached results, checkpoints, "
              "finished files); rerun the same command to go on", file=sys.stderr)
        _die_of_sigint()


def _die_of_sigint() -> NoReturn:
    """End by SIGINT itself, not exit 130, so a calling shell script or loop stops as on any Ctrl-C."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def _command(args: argparse.Namespace) -> str:
    """The command line's words, e.g. `eval sweep`."""
    return " ".join(filter(None, [args.command, *(getattr(args, f"{group}_command", None) for group in
                                                  ("data", "teacher", "search", "d2llm", "submit", "eval"))]))

if __name__ == "__main__":
    sys.exit(main())
