"""Step checkpoints: `step-N/` directories that count only when complete.

A step directory is built under a temporary name and renamed into place after its `COMPLETE`
marker is written, so a crash mid-save leaves nothing that resume could mistake for a checkpoint.
Resume takes the newest complete step; older ones beyond `keep_last` are pruned after a save.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from toolkit.atomic import atomic_dir

COMPLETE = "COMPLETE"
STEP_RE = re.compile(r"^step-(\d+)$")


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


def save_checkpoint(
    stage_dir: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 2,
) -> Path:
    """Write trainable tensors (safetensors), opaque state (optimizer, RNG...) and JSON metadata."""
    final = stage_dir / f"step-{step}"
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        (tmp / COMPLETE).write_text(f"step {step}\n")
    if keep_last > 0:
        for _, old in complete_steps(stage_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    for name in ("trainable.safetensors", "state.pt", "meta.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: missing from a checkpoint marked complete")
    tensors = load_file(str(path / "trainable.safetensors"))
    state = torch.load(path / "state.pt", weights_only=False)
    meta = json.loads((path / "meta.json").read_text())
    return tensors, state, meta
