"""An evaluation sweep: which (model or checkpoint, task group) jobs to run, and where each model sits
in training (stage, global step) so results can be plotted against it.

Planning and gathering only: the jobs run wherever a launcher puts them (in this process, Ray tasks,
a SLURM array) through `toolkit.eval.mteb_run.run_job`; each job writes through mteb's result cache, so a rerun after an interruption
computes only what is missing and the gathered table is the same.
"""

from __future__ import annotations

import glob
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from toolkit.errors import InputError, MissingPathError
from toolkit.models.folder import SPEC_FILE
from toolkit.run_layout import COMPLETE, FINAL_DIR, RunLayout, parse_stage_dir, parse_step_dir

BASELINES = ("minilm",)


@dataclass(frozen=True)
class SweepModel:
    spec: str  # what the evaluator loads: an encoder folder, a step-N/ checkpoint, or a baseline name
    label: str  # how tables and plots name it: run/stage/step-N, a folder name, or the baseline
    run: str | None = None  # the training run it comes from (plots draw one line per run)
    stage: str | None = None
    step: int | None = None  # global training step (earlier stages' steps added), None for baselines


@dataclass(frozen=True)
class SweepJob:
    model: SweepModel
    tasks: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "tasks": list(self.tasks)}

    @staticmethod
    def from_dict(d: dict) -> "SweepJob":
        return SweepJob(SweepModel(**d["model"]), tuple(d["tasks"]))


def expand_models(models: list[str], checkpoints: list[str]) -> list[SweepModel]:
    """`--models` (encoder folders or baseline names) and `--checkpoints` (paths or globs of `step-N/`
    or stage `final/` folders) as sweep models, in training order within each run."""
    out: list[SweepModel] = []
    for m in models:
        if m in BASELINES:
            out.append(SweepModel(spec=m, label=m))
        else:
            out.append(_checkpoint_model(Path(m)) if _is_checkpoint(Path(m)) else _folder_model(Path(m)))
    for pattern in checkpoints:
        paths = [Path(p) for p in sorted(glob.glob(pattern))] if any(c in pattern for c in "*?[") else [Path(pattern)]
        if not paths:
            raise MissingPathError(f"--checkpoints {pattern}: matches nothing")
        found = [_checkpoint_model(p) for p in paths if _is_checkpoint(p) or (p / SPEC_FILE).is_file()]
        if not found:
            raise MissingPathError(f"--checkpoints {pattern}: no complete step-N/ checkpoint or final/ folder there")
        out.extend(sorted(found, key=lambda m: (m.run or "", m.step if m.step is not None else -1)))
    labels = [m.label for m in out]
    if len(set(labels)) != len(labels):
        raise InputError(f"the sweep names a model twice: {sorted(x for x in labels if labels.count(x) > 1)}")
    return out


def plan_jobs(models: list[SweepModel], tasks: list[str], tasks_per_job: int = 1) -> list[SweepJob]:
    """One job per (model, group of `tasks_per_job` tasks): the unit a worker runs and may retry."""
    if not tasks:
        raise InputError("the sweep has no tasks")
    groups = [tuple(tasks[i : i + tasks_per_job]) for i in range(0, len(tasks), max(1, tasks_per_job))]
    return [SweepJob(m, g) for m in models for g in groups]


def write_jobs(jobs: list[SweepJob], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([j.to_dict() for j in jobs], indent=1))


def read_jobs(path: Path) -> list[SweepJob]:
    return [SweepJob.from_dict(d) for d in json.loads(Path(path).read_text())]


# ---------------------------------------------------------------------------------------------- helpers
def _is_checkpoint(path: Path) -> bool:
    return parse_step_dir(path) is not None and (path / COMPLETE).is_file()


def _folder_model(path: Path) -> SweepModel:
    if not (path / SPEC_FILE).is_file():
        raise MissingPathError(f"{path}: not an encoder folder ({SPEC_FILE} missing), a complete step-N/ checkpoint "
                               f"or a baseline ({', '.join(BASELINES)})")
    if path.name == FINAL_DIR and parse_stage_dir(path.parent):
        return _checkpoint_model(path)
    return SweepModel(spec=str(path), label=path.name)


def _checkpoint_model(path: Path) -> SweepModel:
    """A `RUN/NN-stage/step-N` or `RUN/NN-stage/final` folder, placed on the run's global step axis."""
    stage_dir, run_dir = path.parent, path.parent.parent
    parsed = parse_stage_dir(stage_dir)
    if not parsed:
        raise InputError(f"{path}: expected RUN/NN-stage/step-N or RUN/NN-stage/final")
    index, stage = parsed
    steps = _stage_steps(run_dir)
    before = sum(steps[:index]) if len(steps) >= index else 0
    step = parse_step_dir(path)
    within = step if step is not None else (steps[index] if index < len(steps) else 0)
    return SweepModel(spec=str(path), label=f"{run_dir.name}/{stage}/{path.name}", run=run_dir.name, stage=stage,
                      step=before + within)


def _stage_steps(run_dir: Path) -> list[int]:
    config = RunLayout(run_dir).config_file
    if not config.is_file():
        return []
    stages = (yaml.safe_load(config.read_text()) or {}).get("stages", [])
    return [int(s.get("steps", 0)) for s in stages]
