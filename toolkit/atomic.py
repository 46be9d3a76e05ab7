"""Atomic writes: build in a temp sibling, rename into place, so a crash never leaves half a folder."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from toolkit.errors import OutputError, PathExistsError

_STARTED = time.time()  # about when this process started: a temp folder older than this is not ours


def output_error(path: str | os.PathLike, exc: OSError) -> OutputError:
    """`cannot write PATH: reason` for an OSError met while creating an output (not a programming error)."""
    path = Path(path)
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():  # mkdir says "File exists" or "Not a directory"
        return OutputError(f"cannot write {path}: {blocker} is a file, not a directory")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and its parents) and check a file can be created in it, else OutputError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise output_error(path, exc) from exc
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temps(final: str | os.PathLike) -> list[Path]:
    """Remove the temp / old siblings atomic_dir left next to `final` when a process died mid-write:
    `.NAME.tmp-PID-*` and `.NAME.old-PID` of a process that is gone (or of an older one with this
    pid), and pid-less `.NAME.tmp-*` older than this process. Returns what was removed."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:tmp|old)-(?:(\d+)(?:-|\Z))?")
    removed = []
    for entry in final.parent.iterdir():
        match = pattern.match(entry.name)
        if not match:
            continue
        try:
            old = entry.stat().st_mtime < _STARTED
        except FileNotFoundError:
            continue
        pid = int(match.group(1)) if match.group(1) else None
        if not old or (pid is not None and pid != os.getpid() and _pid_alive(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a plain mkdir / open would (0o777 / 0o666 less
    the umask; executables keep x): mkdtemp's 0700 would lock a team out of each other's models."""
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        path.chmod((0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp dir next to `final`; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise PathExistsError(f"{final}: already exists (refusing to overwrite)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    except OSError as exc:
        raise output_error(final, exc) from exc
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    apply_umask(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
