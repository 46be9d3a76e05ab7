"""Deterministic, resumable batch plans.

A plan is a pure function of (seed, epoch): the batches of an epoch are recomputed, never stored,
so the loader state is just (epoch, batch index) and a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import numpy as np


@dataclass
class LoaderState:
    epoch: int = 0
    batch: int = 0  # index of the next batch within the epoch

    def to_dict(self) -> dict:
        return asdict(self)


class BatchPlan:
    """Batches of sample indices.

    - length bucketing: shuffle, then sort windows of `bucket_batches` batches by length, so a batch
      holds similar lengths (little padding) while batch order stays random;
    - homogeneous tasks: every batch comes from one task; incomplete batches are dropped
      (in-batch negatives from another task would be trivially easy).
    """

    def __init__(
        self,
        batch_size: int,
        seed: int,
        *,
        lengths: Sequence[int] | None = None,
        tasks: Sequence[str] | None = None,
        shuffle: bool = True,
        bucket_batches: int = 50,
        num_samples: int | None = None,
    ):
        n = num_samples if num_samples is not None else len(lengths if lengths is not None else tasks or [])
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.tasks = None if tasks is None else np.asarray(tasks)
        self.bucket = bucket_batches * batch_size
        if self.batches_per_epoch() == 0:
            raise ValueError(f"{n} samples make no full batch of data.batch_size={batch_size}")

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = self._rng(epoch)
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.tasks is not None:
            batches = []
            for task in sorted(set(self.tasks.tolist())):
                members = order[self.tasks[order] == task]
                full = len(members) // self.batch_size * self.batch_size
                batches += np.split(members[:full], full // self.batch_size) if full else []
        else:
            batches = []
            for start in range(0, self.n - self.batch_size + 1, self.bucket):
                window = order[start : start + self.bucket]
                if self.lengths is not None:
                    window = window[np.argsort(self.lengths[window], kind="stable")]
                full = len(window) // self.batch_size * self.batch_size
                batches += np.split(window[:full], full // self.batch_size) if full else []
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def iterate(self, state: LoaderState) -> Iterator[tuple[np.ndarray, LoaderState]]:
        """Endless batches from `state`; yields (indices, state after this batch)."""
        epoch, index = state.epoch, state.batch
        while True:
            batches = self.epoch_batches(epoch)
            while index < len(batches):
                index += 1
                yield batches[index - 1], LoaderState(epoch, index)
            epoch, index = epoch + 1, 0
