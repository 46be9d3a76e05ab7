"""Step checkpoints: `step-N/` directories that count only when complete.

A step directory is built under a temporary name (every rank writes its part), and rank 0 renames
it into place after its `COMPLETE` marker is written, so a crash mid-save leaves nothing that resume
could mistake for a checkpoint. What goes inside is the engine's business (see toolkit/engines).
Resume takes the newest complete step; older ones beyond `keep_last` are pruned after a save.

Integrity: rank 0 records the sha256 and size of every file of a step in its `meta.json` before
writing `COMPLETE`; a step is verified before anything reads it, and `--resume auto` falls back to
the newest step that verifies. Disk space: a save first checks the free space against the previous
step's size (pruning older steps that `keep_last` would drop anyway), and a full disk mid-save is
one line naming the need and the path, with the newest complete step left intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch.distributed as dist

from toolkit.atomic import remove_stale_temps
from toolkit.checkpoint.integrity import first_mismatch, tree_checksums
from toolkit.errors import CheckpointError, EmbedforgeError, MissingPathError
from toolkit.run_layout import COMPLETE, FINAL_DIR, STEP_RE, step_dir_name

log = logging.getLogger(__name__)
META = "meta.json"
FILES = "files"  # meta.json's field: {relative path: {"sha256", "bytes"}}
STALE_GLOBS = (".step-*.partial", ".step-*.old", ".step-*.deepspeed-universal")  # crashed saves, conversions
T = TypeVar("T")
_verified: set[str] = set()  # steps this process already verified (resume verifies once)
_warned_unchecked: set[str] = set()

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


def rank0_decides(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give every rank its result, or its error: a check that fails on
    rank 0 must not leave the other ranks waiting in a barrier."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except EmbedforgeError as exc:
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def clean_stale(stage_dir: Path) -> None:
    """Remove what crashed saves of this stage left (`.step-N.partial`, atomic tmp folders): never
    resumed from, and on a full disk they hold the space the next save needs."""
    for pattern in STALE_GLOBS:
        for path in stage_dir.glob(pattern):
            log.warning("%s: removing a leftover of an interrupted save", path)
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    for path in remove_stale_temps(stage_dir / FINAL_DIR):  # final/'s atomic temps of a dead process
        log.warning("%s: removed a leftover of an interrupted write", path)


def begin_step_dir(stage_dir: Path, step: int, rank: int, keep_last: int = 0) -> Path:
    """A fresh temporary directory every rank writes its part of `step-N/` into, after making room."""
    tmp = stage_dir / f".{step_dir_name(step)}.partial"

    def prepare() -> None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        clean_stale(stage_dir)  # includes a crashed save's own tmp: never complete, never resumed from
        ensure_space(stage_dir, keep_last)
        tmp.mkdir(parents=True)

    if dist.is_available() and dist.is_initialized():
        rank0_decides(prepare)
    elif rank == 0:
        prepare()
    _barrier()
    return tmp


def step_bytes(step_dir: Path) -> int:
    """A complete step's size: from its recorded checksums, else from the files on disk."""
    try:
        files = json.loads((step_dir / META).read_text()).get(FILES)
    except (OSError, json.JSONDecodeError):
        files = None
    if isinstance(files, dict):
        return sum(int(f.get("bytes", 0)) for f in files.values())
    return sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f}"


def ensure_space(stage_dir: Path, keep_last: int) -> None:
    """Free space for one more step (estimated by the newest complete one), pruning the oldest steps
    that `keep_last` would prune after this save anyway; never the newest complete step."""
    steps = complete_steps(stage_dir)
    if not steps:
        return  # nothing to estimate from: a full disk mid-save is caught by `disk_full_guard`
    need = step_bytes(steps[-1][1])
    survivors = max(1, keep_last - 1) if keep_last > 0 else len(steps)
    while shutil.disk_usage(stage_dir).free < need and len(steps) > survivors:
        _, oldest = steps.pop(0)
        log.warning("%s: pruned before saving to make room (%s GB needed)", oldest, _gb(need))
        shutil.rmtree(oldest, ignore_errors=True)
    free = shutil.disk_usage(stage_dir).free
    if free < need:
        raise CheckpointError(f"no space left on device, need {_gb(need)} GB at {stage_dir} ({_gb(free)} GB free); "
                              f"free some space (or lower checkpoint.keep_last) and resume")


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, or torch.save's RuntimeError that lost it ('unexpected pos', 'file write failed')."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(k in text for k in ("unexpected pos", "file write failed",
                                                                     "No space left", "Disk quota"))


@contextlib.contextmanager
def disk_full_guard(tmp: Path) -> Iterator[None]:
    """A full disk while writing `tmp` becomes one line naming the need and the path; the partial
    step is removed (its space freed) and the newest complete step stays as it was."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not _is_disk_full(exc):
            raise
        steps = complete_steps(tmp.parent)
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.exists() else 0
        need = step_bytes(steps[-1][1]) if steps else written
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"no space left on device, need {'' if steps else 'more than '}{_gb(need)} GB at "
                              f"{tmp.parent} ({_gb(shutil.disk_usage(tmp.parent).free)} GB free after removing the "
                              f"partial save); free some space and resume") from None


def commit_step_dir(tmp: Path, meta: dict[str, Any], rank: int, keep_last: int = 2) -> Path:
    """After every rank wrote into `tmp`: marker + rename by rank 0, then prune old complete steps."""
    final = final_name(tmp)
    _barrier()
    if rank == 0:
        mark_complete(tmp, meta, keep_last)
    _barrier()
    return final


def final_name(tmp: Path) -> Path:
    return tmp.parent / tmp.name.removeprefix(".").removesuffix(".partial")


def mark_complete(tmp: Path, meta: dict[str, Any], keep_last: int) -> Path:
    """Rank 0's part of a commit, once every rank's files are in `tmp`: checksums into meta.json,
    COMPLETE, the rename to step-N/ and the pruning (no collective: an async save runs it aside)."""
    final = final_name(tmp)
    meta = {**meta, FILES: tree_checksums(tmp, skip=(META, COMPLETE))}  # every rank's files are in
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    (tmp / COMPLETE).write_text(f"step {meta.get('step')}\n")
    aside = tmp.parent / f".{final.name}.old"
    if final.exists():
        final.rename(aside)  # never a moment without a complete step-N
    tmp.rename(final)
    _verified.discard(str(final.resolve()))
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
    return final


def read_meta(path: Path) -> dict[str, Any]:
    if not (path / COMPLETE).is_file():
        raise MissingPathError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    meta_file = path / META
    if not meta_file.is_file():
        raise MissingPathError(f"{meta_file}: missing from a checkpoint marked complete")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_file}: invalid JSON ({exc})") from None


def verify_step(path: Path) -> None:
    """Every file of a complete step matches the checksum recorded at commit; else a CheckpointError
    naming the file and the older complete steps to resume from instead."""
    key = str(path.resolve())
    if key in _verified:
        return
    meta = read_meta(path)
    recorded = meta.get(FILES)
    if not isinstance(recorded, dict):
        if str(path.parent) not in _warned_unchecked:
            _warned_unchecked.add(str(path.parent))
            log.warning("%s: written before checkpoints carried checksums; loading it unverified", path)
        return
    problem = first_mismatch(path, recorded)
    if problem:
        m = STEP_RE.match(path.name)
        number = int(m.group(1)) if m else None
        older = [str(p) for n, p in complete_steps(path.parent) if number is None or n < number]
        hint = f"resume from an older step ({', '.join(older)}) with --resume PATH" if older else \
            "no older complete step exists; start a new output_dir"
        raise CheckpointError(f"{problem}: the checkpoint is corrupt; {hint}")
    _verified.add(key)


def verify_checkpoint(path: Path) -> None:
    """`verify_step`, done by rank 0 and its verdict shared (every rank reading every file is N times the I/O)."""
    rank0_decides(lambda: verify_step(path))


def newest_verified(stage_dir: Path) -> Path | None:
    """`--resume auto`: the newest complete step that verifies, falling back (with a warning) past
    corrupt ones; stale partial saves are removed first. A CheckpointError if none verifies."""

    def pick() -> Path | None:
        clean_stale(stage_dir) if stage_dir.is_dir() else None
        steps = complete_steps(stage_dir)
        problems = []
        for _, path in reversed(steps):
            try:
                verify_step(path)
            except CheckpointError as exc:
                problems.append(str(exc).split(": the checkpoint is corrupt")[0])
                log.warning("%s: corrupt (%s); falling back to an older step", path, problems[-1])
                continue
            return path
        if problems:
            raise CheckpointError(f"{stage_dir}: no complete step verifies ({'; '.join(problems)}); "
                                  "restore a step from a backup, or start a new output_dir")
        return None

    return rank0_decides(pick)
