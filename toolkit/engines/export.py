"""Turn a run, a finished stage or a mid-stage `step-N/` checkpoint into an Encoder folder.

A finished stage is already an encoder folder. A step checkpoint is in the format of the engine
that wrote it (`meta.json` names it), so its engine's spec exports it (`EngineSpec.export_step`):
it rebuilds the stage's starting model from the run's `config.yaml`, loads what trained and merges.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from toolkit.assets import resolve_model_path
from toolkit.atomic import atomic_dir
from toolkit.checkpoint.manager import complete_steps, read_meta, verify_step
from toolkit.config import RunConfig, load_config
from toolkit.engines.spec import DEFAULT_ENGINE, engine_spec
from toolkit.errors import CheckpointError, InputError, MissingPathError
from toolkit.models.export import check_serving_length, set_folder_max_length
from toolkit.models.folder import SPEC_FILE
from toolkit.run_layout import COMPLETE, FINAL_DIR, RunLayout, parse_stage_dir, parse_step_dir

PARTIAL_RE = re.compile(r"^\.step-(\d+)\.partial\Z")  # a step-N/ being written (begin_step_dir)


def finished_stages(run_dir: Path) -> list[Path]:
    """The `final/` encoder folders of a run's finished stages, in stage order."""
    return [d / FINAL_DIR for d in RunLayout(Path(run_dir)).stage_dirs() if (d / FINAL_DIR / SPEC_FILE).is_file()]


def consolidate(source: Path, output: Path, max_seq_length: int = 0) -> Path:
    """Write an Encoder folder for `source` (run dir, stage dir, stage `final/`, or `step-N/`), encoding
    at `max_seq_length` tokens (0: what the folder records, or for a step-N/ its run's export.max_seq_length)."""
    source = Path(source)
    if not source.exists():
        raise MissingPathError(f"{source}: no such file or directory")
    if (source / SPEC_FILE).is_file():  # already an encoder folder
        with atomic_dir(output) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            if max_seq_length:
                set_folder_max_length(tmp, max_seq_length, field="--max-seq-length")
        return output
    if (source / COMPLETE).is_file():
        return export_step(source, output, max_seq_length)
    if RunLayout(source).is_run():  # a run directory: its newest finished stage
        finals = finished_stages(source)
        if not finals:
            raise MissingPathError(f"{source}: no finished stage yet; export a step checkpoint (…/NN-stage/step-N) instead")
        return consolidate(finals[-1], output, max_seq_length)
    if parse_stage_dir(source) and (source / FINAL_DIR / SPEC_FILE).is_file():
        return consolidate(source / FINAL_DIR, output, max_seq_length)
    step = PARTIAL_RE.match(source.name)
    if parse_step_dir(source) is not None or step:
        complete = [str(p) for _, p in complete_steps(source.parent)]
        older = f"export an older complete step: {', '.join(complete)}" if complete else \
            f"{source.parent} has no complete step-N checkpoint to export"
        raise CheckpointError(f"{source}: an incomplete checkpoint (no {COMPLETE} marker: its save was "
                              f"interrupted); {older}")
    raise MissingPathError(
        f"{source}: not an encoder folder, a run directory ({RunLayout(source).config_file.name}), a stage directory "
        "or a complete step-N checkpoint"
    )


def export_step(step_dir: Path, output: Path, max_seq_length: int = 0) -> Path:
    """A complete `<run>/<NN>-<stage>/step-N/` checkpoint as an encoder folder, by the engine that wrote it
    (`max_seq_length` > 0 replaces the run's export.max_seq_length)."""
    stage = parse_stage_dir(step_dir.parent)
    layout = RunLayout.of_stage_dir(step_dir.parent)
    if stage is None or not layout.is_run():
        raise CheckpointError(f"{step_dir}: expected <run>/<NN>-<stage>/step-N with <run>/{layout.config_file.name}")
    overrides = [f"export.max_seq_length={max_seq_length}"] if max_seq_length else []
    cfg: RunConfig = load_config(layout.config_file, overrides, relative_to_recipe=False)  # paths as the run used them
    index, name = stage
    if index >= len(cfg.stages) or cfg.stages[index].name != name:
        raise CheckpointError(f"{step_dir}: stage {step_dir.parent.name} is not in {layout.config_file}")
    if max_seq_length and cfg.stages[index].objective.kind == "teacher":
        raise InputError(f"--max-seq-length: {step_dir} is a teacher stage's checkpoint (a causal LM that reads "
                         "prompts up to its recorded prompt length), not an encoder; drop the flag")
    if max_seq_length:  # named as the user gave it, before anything is written
        check_serving_length(resolve_model_path(cfg.model.path), max_seq_length, field="--max-seq-length")
    verify_step(step_dir)  # a corrupt file fails here, named, not as garbage weights in the export
    spec = engine_spec(read_meta(step_dir).get("engine", DEFAULT_ENGINE))
    return spec.export_step(cfg, index, step_dir, output)
