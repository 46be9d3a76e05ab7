"""The LLM2Vec stage study on CPU: which stage moves embedding quality, on every local task.

For each seed, trains configs/llm2vec/stage-study.yaml (MNTP -> SimCSE -> supervised on WordNet
training families) into OUTPUT/seed-S, writes the untrained causal and bidirectional encoders as
folders, runs `embedforge eval sweep` over every stage's final folder, those two and all-MiniLM-L6-v2
on the local tasks (its table, CSV and plots in OUTPUT/sweep), then prints and writes
OUTPUT/study.md: the mean of each (stage, task) over the seeds with its standard error (std / sqrt(n),
n = seeds; "-" with one seed), after each seed. Each run resumes where it stopped, and the sweep computes only what
its cache lacks, so rerunning with more seeds adds to the study.

`--settings` then measures, on the first seed, the evaluation-time settings (weighted-mean pooling, no
instructions) and `--train-settings` the training-time ones (TRAIN_SETTINGS: one value changed in one
stage, that stage retrained from the seed's own earlier stages with everything else the same, and the
later stages left out: an MNTP setting is measured at + mntp), each against the seed's own row for that
stage: study.md's second table, next to the stage's standard deviation over the seeds (the spread of one
run, the yardstick for a difference between two runs).

    .venv/bin/python bench/stage_study.py --seeds 0 1 2 --output runs/stage-study
    .venv/bin/python bench/stage_study.py --seeds 0 1 2 --train-settings --settings-tasks \\
        EmbedforgeWordNetRetrieval EmbedforgeWordNetSameSense EmbedforgeSpeechContinuation

Ctrl-C stops the running child (a training run saves a checkpoint first); rerun the same command to go on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.config import load_config, to_dict  # noqa: E402
from toolkit.eval.mteb_model import Instructions  # noqa: E402
from toolkit.eval.mteb_tasks import LOCAL_MTEB_TASKS  # noqa: E402
from toolkit.models.folder import SPEC_FILE, serving_length  # noqa: E402
from toolkit.models.loading import build_encoder  # noqa: E402
from toolkit.run_layout import RunLayout  # noqa: E402

RECIPE = ROOT / "configs" / "llm2vec" / "stage-study.yaml"
EMBEDFORGE = str(Path(sys.executable).with_name("embedforge"))
# speech halves of 128 words (~170 tokens, 2.7x the 64-token training crop) keep one sweep row of a
# SmolLM2 stage at ~6 minutes on 2 cores; at the task's default 300 words a row takes ~15
STUDY_SIZES = ("speech-continuation.half_words=128",)
STAGES = ("causal", "bidirectional", "+ mntp", "+ simcse", "+ supervised")
# the training-time settings: name -> (the stage retrained, its overrides); the study recipe's values are
# mask_probability 0.2, mask_token underscore, 100 MNTP steps; SimCSE attention_dropout 0.3, batch 32,
# LoRA r 16 (alpha 2r), lr 1e-4, 80 steps
TRAIN_SETTINGS = {
    "mntp-mask-probability-0.4": ("mntp", ["objective.mntp.mask_probability=0.4"]),
    "mntp-mask-token-eos": ("mntp", ["objective.mntp.mask_token=eos"]),
    "mntp-steps-200": ("mntp", ["steps=200", "schedule.warmup_steps=20"]),
    "simcse-dropout-0.1": ("simcse", ["attention_dropout=0.1"]),
    "simcse-batch-64": ("simcse", ["data.batch_size=64"]),  # also twice the sentences seen
    "simcse-lora-r-64": ("simcse", ["lora.r=64", "lora.alpha=128"]),
    "simcse-lr-3e-4": ("simcse", ["optimizer.lr=3.0e-4"]),
    "simcse-steps-160": ("simcse", ["steps=160", "schedule.warmup_steps=16"]),
}
# settings that need activation recomputation to fit 24 GiB: SimCSE at batch 64 x 2 views x 64 tokens on
# SmolLM2-135M was OOM-killed at 22.5 GiB resident (~2.2 GiB with recomputation). Recomputation changes memory and
# speed, not the loss: torch.utils.checkpoint restores the RNG state, so the recomputed dropout masks are the
# same (tests/test_train.py::test_gradcache_step_equals_plain_step trains with it on, dropout included). The
# flag is part of a run's settings: a folder started without it is refused on resume; delete it first.
RECOMPUTE = {"simcse-batch-64"}


def train(seed: int, out: Path) -> dict[str, Path]:
    """The seed's folders by the name the sweep gives them (trained here or found from an earlier run)."""
    run = out / f"seed-{seed}"
    code = run_child([EMBEDFORGE, "train", str(RECIPE), f"seed={seed}", f"output_dir={run}", "--resume", "auto"])
    if code != 0:
        raise SystemExit(f"training seed {seed} stopped (exit {code}); rerun to resume")
    cfg = load_config(RECIPE, [f"seed={seed}", f"output_dir={run}"])
    folders = {}
    for label, bidirectional in (("causal", False), ("bidirectional", True)):
        encoder, _ = build_encoder(cfg.model, cfg.pooling, seed=seed, bidirectional=bidirectional)
        # without pooling parameters the untrained encoder is the pretrained model whatever the seed:
        # one folder (seed 0's name, as the cache knows it) instead of the same scores once per seed
        shared = not encoder.pooling.has_parameters
        folder = out / f"untrained-{label}-seed-{0 if shared else seed}"  # the sweep names a folder by its name
        if not (folder / "embedforge.json").is_file():
            encoder.save_pretrained(folder, max_length=serving_length(cfg, encoder.backbone.config))
        folders[folder.name] = folder
    for index, stage in enumerate(cfg.stages):  # a stage's final/: RUN/STAGE/final
        folders[f"{run.name}/{stage.name}/final"] = RunLayout(run).final_dir(index, stage.name)
    return folders


def pooling_variant(folder: Path, out: Path, label: str, mode: str) -> Path:
    """`folder` encoding with another pooling mode (a parameter-free one): its files linked, its
    embedforge.json rewritten (the sentence-transformers files keep the old mode: the sweep reads only
    embedforge.json). Named `<label>-pool-<mode>` for the sweep."""
    variant = out / "variants" / f"{label}-pool-{mode}"
    if not (variant / SPEC_FILE).is_file():
        link_files(folder, variant, skip=SPEC_FILE)
        spec = json.loads((folder / SPEC_FILE).read_text())
        spec["pooling"]["mode"] = mode
        (variant / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    return variant


def link_files(source: Path, dest: Path, skip: str | None = None) -> None:
    """`dest` made of relative symlinks to `source`'s entries (but `skip`), so a moved study keeps them."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        link = dest / item.name
        if item.name != skip and not link.exists():
            if link.is_symlink():  # dangling
                link.unlink()
            link.symlink_to(os.path.relpath(item.resolve(), dest.resolve()))


def run_child(cmd: list[str]) -> int:
    """The child's exit code. A Ctrl-C reaches the child alone (the terminal sends it to both), so a
    training run saves its checkpoint before it stops instead of being killed by this process."""
    child = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def settings(seed: int, out: Path, tasks: list[str] | None, sizes: list[str], folders: dict[str, Path]) -> list[dict]:
    """The evaluation-time settings on one seed: weighted-mean pooling (the untrained causal model and
    the + simcse encoder, both trained or built with mean pooling) and no instructions at all (+ simcse
    and + supervised), each against the same folders' default rows."""
    layout = RunLayout(out / f"seed-{seed}")
    simcse, supervised = layout.final_dir(1, "simcse"), layout.final_dir(2, "supervised")
    causal = next(path for label, path in folders.items() if label.startswith("untrained-causal-seed-"))
    pooled = {"causal": pooling_variant(causal, out, "causal", "weighted_mean"),
              "simcse": pooling_variant(simcse, out, f"simcse-seed-{seed}", "weighted_mean")}
    rows = sweep(pooled, out, tasks, sizes, minilm=False, name="sweep-pooling")
    table = out / "no-instructions.json"  # every local task (and type) without an instruction
    table.write_text(json.dumps({"tasks": {name: "" for name in LOCAL_MTEB_TASKS},
                                 "task_types": {kind: "" for kind in Instructions().task_types}}))
    plain = sweep({"simcse": simcse, "supervised": supervised}, out, tasks, sizes, minilm=False,
                  extra=["--instructions", str(table)], name="sweep-no-instructions")
    return [*rows, *({**r, "model": r["model"] + " (no instructions)"} for r in plain)]


def train_setting(name: str, seed: int, out: Path) -> Path:
    """Retrain one stage of seed `seed`'s chain with TRAIN_SETTINGS[name] into
    OUTPUT/train-settings/seed-S/NAME: the stages before it are the seed's own finals (linked file by
    file, so the run skips them and starts from the same weights), the stages after it are left out.
    Returns the retrained stage's final/ (the sweep names it NAME/STAGE/final)."""
    stage, overrides = TRAIN_SETTINGS[name]
    run = out / "train-settings" / f"seed-{seed}" / name
    memory = ["model.gradient_checkpointing=true"] if name in RECOMPUTE else []
    cfg = load_config(RECIPE, [f"stages.{stage}.{o}" for o in overrides] + memory
                      + [f"seed={seed}", f"output_dir={run.resolve()}"])
    index = [s.name for s in cfg.stages].index(stage)
    cfg.stages = cfg.stages[: index + 1]
    seed_layout, layout = RunLayout(out / f"seed-{seed}"), RunLayout(run)
    for i, earlier in enumerate(cfg.stages[:index]):
        source = seed_layout.final_dir(i, earlier.name)
        if not (source / SPEC_FILE).is_file():
            raise SystemExit(f"{source}: missing; train seed {seed} first (--seeds {seed})")
        linked = layout.final_dir(i, earlier.name)
        if not (linked / SPEC_FILE).is_file():  # first run, or links left dangling by a moved study
            building = linked.with_name("final.linking")
            shutil.rmtree(building, ignore_errors=True)  # removes the links, never what they point at
            link_files(source, building)
            shutil.rmtree(linked, ignore_errors=True)
            building.rename(linked)
    file = run / "recipe.yaml"
    run.mkdir(parents=True, exist_ok=True)
    file.write_text(f"# {RECIPE.name} with stage {stage}: {' '.join(overrides + memory)} (bench/stage_study.py)\n"
                    + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    code = run_child([EMBEDFORGE, "train", str(file), "--resume", "auto"])
    if code != 0:
        raise SystemExit(f"training setting {name} stopped (exit {code}); rerun to resume")
    return layout.final_dir(index, stage)


def setting_deltas(rows: list[dict], seed: int) -> str:
    """Markdown: each training-time setting's score minus the seed's own row for the same stage, next to
    that stage's standard deviation over the seeds: a difference between two runs is noise below ~2 SD."""
    scores: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        scores.setdefault((stage_of(r["model"]), r["task"]), []).append(r["score"])
    own = {(stage_of(r["model"]), r["task"]): r["score"] for r in rows
           if r["model"].startswith(f"seed-{seed}/")}
    lines = [f"| setting | task | score | seed {seed} | difference | stage SD over seeds |", "|---|---|---|---|---|---|"]
    for r in rows:
        name = r["model"].split("/")[0]
        if name not in TRAIN_SETTINGS:
            continue
        stage = "+ " + TRAIN_SETTINGS[name][0]
        base = own.get((stage, r["task"]))
        if base is None:
            continue
        v = scores.get((stage, r["task"]), [])
        sd = f"{statistics.stdev(v):.1f} (n={len(v)})" if len(v) > 1 else "-"
        lines.append(f"| {stage}, {' '.join(TRAIN_SETTINGS[name][1])} | {r['task']} | {r['score']:.1f} | {base:.1f} | "
                     f"{r['score'] - base:+.1f} | {sd} |")
    return "\n".join(lines)


def standard_error(values: list[float]) -> float | None:
    """Of the mean over seeds: std / sqrt(n); None for one seed."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def stage_of(label: str) -> str:
    """The study row of a sweep label: untrained-causal-seed-0 -> causal, seed-0/mntp/final -> + mntp,
    simcse-seed-0-pool-weighted_mean -> + simcse, weighted_mean pooling."""
    suffix = ""
    if label.endswith(" (no instructions)"):
        label, suffix = label.removesuffix(" (no instructions)"), ", no instructions"
    if "-pool-" in label:
        base, mode = label.split("-pool-")
        base = base.rsplit("-seed-", 1)[0]
        return ("+ " + base if base != "causal" else base) + f", {mode} pooling" + suffix
    if label.startswith("untrained-"):
        return label.removeprefix("untrained-").rsplit("-seed-", 1)[0]
    if label.startswith("seed-") and label.endswith("/final"):
        return "+ " + label.split("/")[1] + suffix
    if label.split("/")[0] in TRAIN_SETTINGS:
        stage, overrides = TRAIN_SETTINGS[label.split("/")[0]]
        return f"+ {stage}, {' '.join(overrides)}"
    return "all-MiniLM-L6-v2" if label == "minilm" else label


def summarise(rows: list[dict]) -> str:
    """Markdown: stage x task, mean +- standard error over seeds."""
    tasks = sorted({r["task"] for r in rows})
    cells: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        stage = stage_of(r["model"])
        cells.setdefault((stage, r["task"]), []).append(r["score"])
    order = [s for s in STAGES if any((s, t) in cells for t in tasks)]  # then the settings' rows, by name
    order += sorted({s for s, _ in cells} - set(order))
    lines = ["| stage | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for stage in order:
        row = []
        for task in tasks:
            v = cells.get((stage, task), [])
            if not v:
                row.append("")
                continue
            mean, se = sum(v) / len(v), standard_error(v)
            row.append(f"{mean:.1f}" + (f" +- {se:.1f}" if se is not None else "") + f" (n={len(v)})")
        lines.append(f"| {stage} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def sweep(folders: dict[str, Path], out: Path, tasks: list[str] | None, sizes: list[str], *, minilm: bool = True,
          extra: list[str] = (), name: str = "sweep") -> list[dict]:
    """`embedforge eval sweep` over the folders (and MiniLM) into OUTPUT/`name` (its cache computes only
    what it lacks); its rows."""
    cmd = [EMBEDFORGE, "eval", "sweep", "--models", *map(str, folders.values()), *(["minilm"] if minilm else []),
           "--output", str(out / name), "--cache", str(out / "sweep" / "cache"), *extra]
    cmd += ["--tasks", *tasks] if tasks else []
    cmd += ["--task-size", *sizes] if sizes else []
    code = run_child(cmd)
    if code != 0:
        raise SystemExit(f"the sweep stopped (exit {code}); rerun to continue it")
    return json.loads((out / name / "results.json").read_text())["rows"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--output", default="runs/stage-study")
    p.add_argument("--tasks", nargs="*", default=None, help="default: every local task")
    p.add_argument("--task-size", nargs="*", default=list(STUDY_SIZES), metavar="TASK.FIELD=N",
                   help=f"local task sizes (default: {' '.join(STUDY_SIZES)})")
    p.add_argument("--settings", action="store_true",
                   help="then the evaluation-time settings on the first seed (pooling, instructions)")
    p.add_argument("--train-settings", nargs="*", default=None, metavar="NAME", choices=sorted(TRAIN_SETTINGS),
                   help="then these training-time settings on the first seed (none named: all of "
                        f"{', '.join(TRAIN_SETTINGS)})")
    p.add_argument("--settings-tasks", nargs="*", default=None, help="the settings' tasks (default: --tasks)")
    args = p.parse_args()
    out = Path(args.output)
    folders: dict[str, Path] = {}
    for seed in args.seeds:  # seed by seed, so a study stopped early still reports the seeds it finished
        folders.update(train(seed, out))
        rows = sweep(folders, out, args.tasks, args.task_size)
        table = summarise(rows)
        (out / "study.md").write_text(table + "\n")
        print(table, flush=True)
    if args.settings:
        rows += settings(args.seeds[0], out, args.settings_tasks or args.tasks, args.task_size, folders)
    if args.train_settings is not None:
        retrained: dict[str, Path] = {}
        for name in args.train_settings or TRAIN_SETTINGS:  # each evaluated once trained: a stop keeps the ones done
            retrained[name] = train_setting(name, args.seeds[0], out)
            setting_rows = sweep(retrained, out, args.settings_tasks or args.tasks, args.task_size, minilm=False,
                                 name="sweep-train-settings")
            print(setting_deltas(rows + setting_rows, args.seeds[0]), flush=True)
        rows += setting_rows
    if args.settings or args.train_settings is not None:
        table = summarise(rows)
        if args.train_settings is not None:
            table += "\n\nTraining-time settings, against the seed's own stage:\n\n" + setting_deltas(rows, args.seeds[0])
        (out / "study.md").write_text(table + "\n")
        print(table, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
