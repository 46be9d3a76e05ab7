"""Read HF safetensors weights lazily and in slices, so a rank reads only the bytes of its TP / PP shard.

A 70B checkpoint does not fit in one host's memory eight times over; `HFWeights` is a read-only
mapping over `model.safetensors` or a sharded `model.safetensors.index.json`. Each file is opened
once (its handles kept until `close()`), and `read(name, rows=, cols=)` returns only the requested
rows / columns: the conversion asks for this rank's rows of a column-parallel weight and its columns
of a row-parallel one.

Two ways to read a slice (`reader=`):
- "pread" (default): positioned reads of exactly the slice's byte ranges (one per row of a column
  slice) on a descriptor advised POSIX_FADV_RANDOM, after `safe_open` has validated the file and
  given each tensor's dtype and shape; the data offsets come from the same (validated) header.
- "mmap": safetensors' own `safe_open(...).get_slice`, which copies the slice out of a memory map.
  Its page faults make the kernel read ahead around every touched page: bench/load_bytes.py
  measured 30x the requested bytes from disk for row slices of 512 KiB (kernel 6.18).
`requested_bytes` counts the bytes asked for (the bench compares it with the OS's count).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from toolkit.errors import CheckpointError, MissingPathError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class _File:
    """One safetensors file: its validating `safe_open` handle, a raw descriptor and its header."""

    def __init__(self, path: Path):
        self.fd = -1
        self.handle = safe_open(str(path), framework="pt")  # refuses a malformed header
        self.fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead past the slices asked for
        length = int.from_bytes(os.pread(self.fd, 8, 0), "little")
        self.header = json.loads(os.pread(self.fd, length, 8))
        self.data_start = 8 + length

    def read(self, path: Path, stored: str, rows: tuple[int, int] | None, cols: tuple[int, int] | None) -> Tensor:
        part = self.handle.get_slice(stored)
        shape, dtype = list(part.get_shape()), DTYPES.get(part.get_dtype())
        begin, end = self.header[stored]["data_offsets"]
        if dtype is None or len(shape) > 2 or (cols and len(shape) != 2):
            return part[(slice(*rows) if rows else slice(None),) + ((slice(*cols),) if cols else ())]
        item = torch.empty((), dtype=dtype).element_size()
        row_bytes = item * (shape[1] if len(shape) == 2 else 1)
        r0, r1 = rows if rows else (0, shape[0] if shape else 1)
        if end - begin != row_bytes * (shape[0] if shape else 1) or not 0 <= r0 <= r1 <= (shape[0] if shape else 1):
            raise CheckpointError(f"{path}: tensor {stored!r} has data_offsets that do not match its shape")
        base = self.data_start + begin
        if cols:
            c0, c1 = cols
            chunks = [os.pread(self.fd, (c1 - c0) * item, base + r * row_bytes + c0 * item) for r in range(r0, r1)]
            data, out_shape = b"".join(chunks), [r1 - r0, c1 - c0]
        else:
            data = os.pread(self.fd, (r1 - r0) * row_bytes, base + r0 * row_bytes)
            out_shape = [r1 - r0] + shape[1:] if shape else []
        expected = item * (out_shape[0] * (out_shape[1] if len(out_shape) == 2 else 1) if out_shape else 1)
        if len(data) != expected:
            raise CheckpointError(f"{path}: tensor {stored!r} is truncated (read {len(data)} of {expected} bytes)")
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(out_shape) if expected else \
            torch.empty(out_shape, dtype=dtype)

    def close(self) -> None:
        if self.fd >= 0:
            self.handle.__exit__(None, None, None)
            os.close(self.fd)
            self.fd = -1

    __del__ = close  # an HFWeights dropped without close() does not leak descriptors


class HFWeights(Mapping):
    """`prefix` is prepended to the stored names (an encoder folder stores `layers.0...`, the
    conversion reads `model.layers.0...`). Use as a context manager, or call `close()`."""

    def __init__(self, folder: str | Path, prefix: str = "", reader: str = "pread"):
        if reader not in ("pread", "mmap"):
            raise ValueError(f"reader={reader!r}: 'pread' or 'mmap'")
        self.path, self.reader = Path(folder), reader
        self._open: dict[Path, _File] = {}
        self.requested_bytes = 0
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            self._files = {prefix + name: (self.path / file, name) for name, file in weight_map.items()}
        elif (self.path / SINGLE).is_file():
            names = self._file(self.path / SINGLE, SINGLE).handle.keys()
            self._files = {prefix + name: (self.path / SINGLE, name) for name in names}
        else:
            raise MissingPathError(f"{self.path}: no {SINGLE} or {INDEX} (engine=megatron reads safetensors)")

    def _file(self, path: Path, stored: str) -> _File:
        """The file's one open (on first use)."""
        if path not in self._open:
            if not path.is_file():
                raise MissingPathError(f"{path}: listed in {INDEX} for {stored!r} but missing")
            self._open[path] = _File(path)
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        path, stored = self._files[name]
        return tuple(self._file(path, stored).handle.get_slice(stored).get_shape())

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> Tensor:
        """Rows [a, b) and / or columns [c, d) of a stored tensor (the whole tensor without either)."""
        path, stored = self._files[name]
        file = self._file(path, stored)
        if self.reader == "pread":
            tensor = file.read(path, stored, rows, cols)
        elif rows is None and cols is None:
            tensor = file.handle.get_tensor(stored)
        else:
            tensor = file.handle.get_slice(stored)[(slice(*rows) if rows else slice(None),) +
                                                   ((slice(*cols),) if cols else ())]
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
        """Close every file (handles, descriptors, memory maps)."""
        for file in self._open.values():
            file.close()
        self._open.clear()

    def __enter__(self) -> "HFWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
