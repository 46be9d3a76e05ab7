"""Read HF safetensors weights lazily, so a rank loads only the tensors of its own TP / PP shard.

A 70B checkpoint does not fit in one host's memory eight times over; `HFWeights` is a read-only
mapping over `model.safetensors` or a sharded `model.safetensors.index.json` that opens a tensor
only when the conversion asks for it.
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
    conversion reads `model.layers.0...`)."""

    def __init__(self, folder: str | Path, prefix: str = ""):
        self.path = Path(folder)
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            self._files = {prefix + name: (self.path / file, name) for name, file in weight_map.items()}
        elif (self.path / SINGLE).is_file():
            with safe_open(str(self.path / SINGLE), framework="pt") as f:
                self._files = {prefix + name: (self.path / SINGLE, name) for name in f.keys()}
        else:
            raise MissingPathError(f"{self.path}: no {SINGLE} or {INDEX} (engine=megatron reads safetensors)")

    def __getitem__(self, name: str) -> Tensor:
        file, stored = self._files[name]
        if not file.is_file():
            raise MissingPathError(f"{file}: listed in {INDEX} for {stored!r} but missing")
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)
