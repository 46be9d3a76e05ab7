"""Step checkpoints: `step-N/` directories that count only when complete.

A step directory is built under a temporary name (every rank writes its part), and rank 0 renames
it into place after its `COMPLETE` marker is written, so a crash mid-save leaves nothing that resume
could mistake for a checkpoint. What goes inside is the engine's business (see toolkit/engines).
Resume takes the newest complete step; older ones beyond `keep_last` are pruned after a save.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from toolkit.errors import CheckpointError, MissingPathError
from toolkit.run_layout import COMPLETE, STEP_RE, step_dir_name


def complete_steps(stage_dir: Path) -> list[tuple[int, Path]]:
    if not stage_dir.is_dir():
        return []
    found = []
    for child in stage_dir.iterdir():
        m = STEP_RE.match(child.name)
        if m and (child / COMPLETE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_complete(stage_dir: Path) -> Path | None:
    steps = complete_steps(stage_dir)
    return steps[-1][1] if steps else None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def begin_step_dir(stage_dir: Path, step: int, rank: int) -> Path:
    """A fresh temporary directory every rank writes its part of `step-N/` into."""
    tmp = stage_dir / f".{step_dir_name(step)}.partial"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash mid-save: never complete, never resumed from
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def commit_step_dir(tmp: Path, meta: dict[str, Any], rank: int, keep_last: int = 2) -> Path:
    """After every rank wrote into `tmp`: marker + rename by rank 0, then prune old complete steps."""
    final = tmp.parent / tmp.name.removeprefix(".").removesuffix(".partial")
    _barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        (tmp / COMPLETE).write_text(f"step {meta.get('step')}\n")
        aside = tmp.parent / f".{final.name}.old"
        if final.exists():
            final.rename(aside)  # never a moment without a complete step-N
        tmp.rename(final)
        shutil.rmtree(aside, ignore_errors=True)
        step = int(meta["step"])
        # Complete steps beyond this one belong to a trajectory abandoned by an explicit --resume of
        # an older step: `--resume auto` must never go back to them.
        for number, old in complete_steps(tmp.parent):
            if number > step:
                shutil.rmtree(old, ignore_errors=True)
        if keep_last > 0:
            for _, old in complete_steps(tmp.parent)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_meta(path: Path) -> dict[str, Any]:
    if not (path / COMPLETE).is_file():
        raise MissingPathError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise MissingPathError(f"{meta_file}: missing from a checkpoint marked complete")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_file}: invalid JSON ({exc})") from None
