"""Checkpoint files are data: checksummed when written, verified before they are read, and torch
files loaded with `weights_only=True`, so a corrupt or received checkpoint fails with a message
naming the file instead of loading garbage or running code (a pickle's `__reduce__`)."""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from toolkit.errors import CheckpointError

_CHUNK = 1 << 22
# What a numpy RNG state pickles to (trainer/dp-N.pt written before RNG states were stored as
# tensors): array reconstruction only, no callable the file chooses.
NUMPY_ARRAY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype,  # type: ignore[attr-defined]
                       type(np.dtype(np.uint32))]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_checksums(root: Path, skip: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `root` (engine folders included), keyed by relative path."""
    skipped = set(skip)
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in skipped:
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def first_mismatch(root: Path, recorded: dict[str, dict[str, Any]]) -> str | None:
    """The first file that differs from what was recorded at commit, as '<file>: what differs'."""
    for rel, want in sorted(recorded.items()):
        path = root / rel
        if not path.is_file():
            return f"{path}: missing (written {want['bytes']} bytes)"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path}: size mismatch (written {want['bytes']} bytes, now {size})"
        now = sha256_file(path)
        if now != want["sha256"]:
            return f"{path}: checksum mismatch (written {want['sha256'][:16]}, now {now[:16]})"
    return None


def load_torch(path: Path, allow: list | None = None, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only (plus the `allow`ed
    classes); anything else, or a truncated file, is a CheckpointError naming the file."""
    try:
        if allow:
            with torch.serialization.safe_globals(allow):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = str(exc).split("GLOBAL", 1)[-1].split(" was not")[0].strip() if "GLOBAL" in str(exc) else "an object"
        raise CheckpointError(f"{path}: holds {found}, not only tensors and plain data; refused (loading it could "
                              "run code). Use a checkpoint written by this toolkit, or resume from an older step") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable ({first}): the file is truncated or corrupt; "
                              "resume from an older step") from None
