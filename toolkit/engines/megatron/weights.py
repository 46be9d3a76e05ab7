"""Read HF safetensors weights lazily and in slices, so a rank reads only the bytes of its TP / PP shard.

A 70B checkpoint does not fit in one host's memory eight times over; `HFWeights` is a read-only
mapping over `model.safetensors` or a sharded `model.safetensors.index.json`. Each file is opened
once (its handle kept until `close()`), and `read(name, rows=, cols=)` goes through safetensors'
`get_slice`, which copies only the requested rows / columns out of the memory-mapped file: the
conversion asks for this rank's rows of a column-parallel weight and its columns of a row-parallel
one. `requested_bytes` counts what was asked for (bench/load_bytes.py compares it with the OS's count).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from toolkit.errors import CheckpointError, MissingPathError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFWeights(Mapping):
    """`prefix` is prepended to the stored names (an encoder folder stores `layers.0...`, the
    conversion reads `model.layers.0...`). Use as a context manager, or call `close()`."""

    def __init__(self, folder: str | Path, prefix: str = ""):
        self.path = Path(folder)
        self._handles: dict[Path, object] = {}
        self.requested_bytes = 0
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            self._files = {prefix + name: (self.path / file, name) for name, file in weight_map.items()}
        elif (self.path / SINGLE).is_file():
            names = self._handle(self.path / SINGLE, SINGLE).keys()
            self._files = {prefix + name: (self.path / SINGLE, name) for name in names}
        else:
            raise MissingPathError(f"{self.path}: no {SINGLE} or {INDEX} (engine=megatron reads safetensors)")

    def _handle(self, file: Path, stored: str):
        """The file's one open handle (opened on first use)."""
        if file not in self._handles:
            if not file.is_file():
                raise MissingPathError(f"{file}: listed in {INDEX} for {stored!r} but missing")
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def _located(self, name: str) -> tuple[object, str]:
        file, stored = self._files[name]
        return self._handle(file, stored), stored

    def shape(self, name: str) -> tuple[int, ...]:
        handle, stored = self._located(name)
        return tuple(handle.get_slice(stored).get_shape())

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> Tensor:
        """Rows [a, b) and / or columns [c, d) of a stored tensor; only those bytes are copied."""
        handle, stored = self._located(name)
        if rows is None and cols is None:
            tensor = handle.get_tensor(stored)
        else:
            index = (slice(*rows) if rows else slice(None),) + ((slice(*cols),) if cols else ())
            tensor = handle.get_slice(stored)[index]
        self.requested_bytes += tensor.numel() * tensor.element_size()
        return tensor

    def __getitem__(self, name: str) -> Tensor:
        return self.read(name)

    def __contains__(self, name: object) -> bool:  # (Mapping's default would read the tensor)
        return name in self._files

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        """Close every file handle (and its memory map)."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "HFWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
