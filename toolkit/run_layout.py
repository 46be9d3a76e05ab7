"""The run folder's layout, written down once.

    <output_dir>/config.yaml                the recipe as run (what export rebuilds a stage from)
    <output_dir>/<NN>-<stage>/step-<N>/     a checkpoint (counts only with its COMPLETE marker)
    <output_dir>/<NN>-<stage>/final/        the stage's merged encoder folder
    <output_dir>/STOPPED, STOP_REQUESTED    run-level markers between the loop and launchers

Trainer, checkpoints, export and evaluation all go through `RunLayout` rather than spelling names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.yaml"
FINAL_DIR = "final"
COMPLETE = "COMPLETE"  # a step-N/ directory's completion marker
STOPPED = "STOPPED"  # the run stopped early with a checkpoint (launchers requeue)
STOP_REQUEST = "STOP_REQUESTED"  # touch it: every rank saves and stops at the next step
# \Z, not $: `$` matches before a trailing newline, so "step-2\n" would pass for a checkpoint folder.
STAGE_RE = re.compile(r"^(\d+)-(.+)\Z")
STEP_RE = re.compile(r"^step-(\d+)\Z")


def stage_dir_name(index: int, name: str) -> str:
    return f"{index:02d}-{name}"


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def parse_stage_dir(path: Path) -> tuple[int, str] | None:
    """(index, stage name) of a `<NN>-<stage>` folder, else None."""
    match = STAGE_RE.match(Path(path).name)
    return (int(match.group(1)), match.group(2)) if match else None


def parse_step_dir(path: Path) -> int | None:
    match = STEP_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of_stage_dir(cls, stage_dir: Path) -> "RunLayout":
        return cls(Path(stage_dir).parent)

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def stopped_marker(self) -> Path:
        return self.root / STOPPED

    @property
    def stop_request(self) -> Path:
        return self.root / STOP_REQUEST

    def is_run(self) -> bool:
        return self.config_file.is_file()

    def stage_dir(self, index: int, name: str) -> Path:
        return self.root / stage_dir_name(index, name)

    def final_dir(self, index: int, name: str) -> Path:
        return self.stage_dir(index, name) / FINAL_DIR

    def step_dir(self, index: int, name: str, step: int) -> Path:
        return self.stage_dir(index, name) / step_dir_name(step)

    def stage_dirs(self) -> list[Path]:
        """Every `<NN>-<stage>` folder, in stage order."""
        found = [d for d in self.root.iterdir() if d.is_dir() and parse_stage_dir(d)] if self.root.is_dir() else []
        return sorted(found, key=lambda d: parse_stage_dir(d)[0])
