"""The streaming, data-parallel-aware, resumable batch loader every training stage reads from.

Layout: a rank runs `data.num_workers` loader workers (0 = in the main process, one logical
worker). Logical worker w of DP rank r is slot r * W + w of the `stream.SlotStream`s. Worker w
produces the rank's global steps w, w + W, w + 2W, ... in the order torch's DataLoader
round-robins them, so a rank's batch sequence is deterministic.

- Homogeneous tasks: the task of global step g is drawn from (seed, g) with the task weights, the
  same on every rank, so a global batch comes from one dataset across all ranks (in-batch and
  cross-device negatives from another task would be trivially easy).
- Bucketing: a worker reads a window of `bucket_batches` batches of one task, sorts it by token
  length and cuts batches (or token-budget batches), in a shuffled order.
- Resumption: every batch carries its worker's state after it (per task: the stream position at
  the start of the current window and how many of its batches were taken). `state_dict()` holds
  the last state of each worker plus the number of batches consumed; a new loader seeks each
  worker there and rotates the physical workers so the round-robin continues where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipelines.batching import window_batches
from data_pipelines.manifest import Manifest, load_manifest
from data_pipelines.records import text_fields
from data_pipelines.stream import DataError, Position, ReadStats, SlotConfig, SlotStream, _rng
from data_pipelines.writer import ensure_asset_shards
from toolkit.config import DataConfig

log = logging.getLogger(__name__)
STATE_VERSION = 1


def open_dataset(path: str) -> Manifest:
    """The manifest of `data.path`: a shard folder, or a packaged `asset:NAME` built into the cache once."""
    if path.startswith("asset:"):
        return load_manifest(ensure_asset_shards(path[len("asset:"):]))
    return load_manifest(path)


def task_weights(manifest: Manifest, weights: dict[str, float]) -> tuple[list[str], np.ndarray]:
    """Tasks and their sampling probabilities: `data.task_weights`, else proportional to size."""
    sizes = manifest.tasks()
    unknown = set(weights) - set(sizes)
    if unknown:
        raise DataError(f"data.task_weights names tasks {sorted(unknown)} not in {manifest.root}; tasks: {sorted(sizes)}")
    tasks = sorted(sizes)
    w = np.array([float(weights.get(t, sizes[t])) if weights else float(sizes[t]) for t in tasks])
    if (w < 0).any() or w.sum() <= 0:
        raise DataError("data.task_weights must be non-negative and not all zero")
    return tasks, w / w.sum()


class _Lengths:
    """Token lengths for bucketing: pre-tokenised ids when the shards carry them, else the tokenizer."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[dict]) -> list[int]:
        if all("tokens" in s for s in samples):
            return [min(self.max_length, max(len(v) for v in s["tokens"].values())) for s in samples]
        if self.tokenizer is None:  # characters are a fair proxy when no tokenizer is at hand
            return [max(len(t) for t in text_fields(s).values()) for s in samples]
        fields = [list(text_fields(s).values()) for s in samples]
        flat = [t for f in fields for t in f]
        ids = self.tokenizer(flat, truncation=True, max_length=self.max_length)["input_ids"]
        out, k = [], 0
        for f in fields:
            out.append(max(len(x) for x in ids[k : k + len(f)]))
            k += len(f)
        return out


class _TaskBatches:
    """One task's batches in one worker: windows cut from a SlotStream, resumable mid-window."""

    def __init__(self, stream: SlotStream, data: DataConfig, lengths: _Lengths, seed: int, skip: int):
        self.stream, self.data, self.lengths, self.seed = stream, data, lengths, seed
        self.window_start = stream.position
        self.taken = 0
        self._skip = skip
        self._samples = iter(stream)
        self._batches: list[list[dict]] = []

    def _refill(self) -> None:
        d = self.data
        bucket = d.bucket_batches if (d.length_bucketing and self.stream.manifest.kind == "text") else 1
        self.window_start, self.taken = self.stream.position, 0
        window = [next(self._samples) for _ in range(bucket * d.batch_size)]
        rng = _rng(self.seed, "window", self.stream.task, self.window_start.to_list()) if d.shuffle else None
        index = window_batches(self.lengths(window), d.batch_size, rng, max_tokens=d.max_tokens, sort=bucket > 1)
        self._batches = [[window[i] for i in b] for b in index]

    def next_batch(self) -> list[dict]:
        while True:
            if not self._batches:
                self._refill()
            batch = self._batches.pop(0)
            self.taken += 1
            if self._skip:
                self._skip -= 1
                continue
            return batch

    def state(self) -> dict:
        return {"window": self.window_start.to_list(), "taken": self.taken}


class ShardBatches(IterableDataset):
    """Batches (lists of sample dicts) of one DP rank, with the producing worker's state."""

    def __init__(self, manifest: Manifest, data: DataConfig, *, seed: int, dp_rank: int, dp_world: int,
                 tokenizer=None, worker_states: dict | None = None, rotation: int = 0):
        self.manifest, self.data, self.seed = manifest, data, seed
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.num_workers = max(1, data.num_workers)
        self.lengths = _Lengths(tokenizer, data.max_length)
        self.worker_states = worker_states or {}
        self.rotation = rotation
        self.tasks, self.probs = task_weights(manifest, data.task_weights)

    def _task_of(self, step: int) -> str:
        if len(self.tasks) == 1:
            return self.tasks[0]
        return self.tasks[int(_rng(self.seed, "task", step).choice(len(self.tasks), p=self.probs))]

    def worker_iter(self, logical: int) -> Iterator[dict]:
        d = self.data
        slot_cfg = SlotConfig(mode=d.mode, seed=self.seed, slot=self.dp_rank * self.num_workers + logical,
                              num_slots=self.dp_world * self.num_workers, shuffle=d.shuffle,
                              shuffle_buffer=d.shuffle_buffer, verify=d.verify,
                              max_chars=d.max_chars, max_bad_fraction=d.max_bad_fraction,
                              url_template=d.shard_url_template, trust_commands=d.trust_manifest_commands)
        saved = self.worker_states.get(str(logical), {})
        stats = ReadStats(**saved.get("stats", {}))
        step = saved.get("next_step", logical)
        per_task: dict[str, _TaskBatches] = {}
        while True:
            task = self._task_of(step)
            if task not in per_task:
                t = saved.get("tasks", {}).get(task, {})
                start = Position(*t["window"]) if "window" in t else Position(saved.get("epoch", 0), 0, 0)
                stream = SlotStream(self.manifest, task, slot_cfg, start, stats)
                per_task[task] = _TaskBatches(stream, d, self.lengths, self.seed, skip=t.get("taken", 0))
            batch = per_task[task].next_batch()
            step += self.num_workers
            state = {"next_step": step, "epoch": saved.get("epoch", 0), "stats": asdict(stats),
                     "tasks": {**saved.get("tasks", {}), **{k: v.state() for k, v in per_task.items()}}}
            yield {"samples": batch, "worker": logical, "state": state, "task": task}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)  # workers only read and tokenise; leave the cores to the model
        yield from self.worker_iter((physical + self.rotation) % self.num_workers)


class StreamingLoader:
    """Endless batches for one DP rank; `state_dict()` / `load_state_dict()` resume exactly."""

    def __init__(self, manifest: Manifest, data: DataConfig, *, seed: int, dp_rank: int = 0, dp_world: int = 1,
                 tokenizer=None):
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_world})")
        self.manifest, self.data, self.seed = manifest, data, seed
        self.dp_rank, self.dp_world, self.tokenizer = dp_rank, dp_world, tokenizer
        self.num_workers = max(1, data.num_workers)
        self.consumed = 0
        self.worker_states: dict[str, dict] = {}
        self.last_task: str | None = None
        ShardBatches(manifest, data, seed=seed, dp_rank=dp_rank, dp_world=dp_world)  # validate tasks early
        manifest.check_urls(data.shard_url_template, data.trust_manifest_commands)  # before any shard opens
        if data.mode == "exact":  # fail now, not in a worker, when shards cannot cover the readers
            for task in manifest.tasks():
                SlotStream(manifest, task, SlotConfig(mode="exact", seed=seed, slot=0, num_slots=dp_world * self.num_workers))

    def steps_per_epoch(self) -> int:
        """About how many batches this rank takes for one pass over the data (from the manifest)."""
        return max(1, self.manifest.num_samples // (self.dp_world * self.data.batch_size))

    def __iter__(self) -> Iterator[list[dict]]:
        dataset = ShardBatches(self.manifest, self.data, seed=self.seed, dp_rank=self.dp_rank, dp_world=self.dp_world,
                               tokenizer=self.tokenizer, worker_states=self.worker_states,
                               rotation=self.consumed % self.num_workers)
        if self.data.num_workers == 0:
            items: Iterator[dict] = iter(dataset)
        else:
            items = iter(DataLoader(dataset, batch_size=None, num_workers=self.data.num_workers,
                                    prefetch_factor=self.data.prefetch, multiprocessing_context="fork"))
        for item in items:
            self.consumed += 1
            self.worker_states[str(item["worker"])] = item["state"]
            self.last_task = item["task"]
            yield item["samples"]

    def stats(self) -> ReadStats:
        total = ReadStats()
        for s in self.worker_states.values():
            total = total.merge(ReadStats(**s["stats"]))
        return total

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "mode": self.data.mode, "seed": self.seed, "dp_world": self.dp_world,
                "dp_rank": self.dp_rank, "num_workers": self.num_workers, "consumed": self.consumed,
                "workers": self.worker_states}

    def load_state_dict(self, state: dict, where: str = "checkpoint") -> None:
        same = state.get("dp_world") == self.dp_world and state.get("num_workers") == self.num_workers
        if state.get("version") != STATE_VERSION or state.get("seed") != self.seed:
            raise DataError(f"{where}: loader state is from another version or seed; cannot resume its data order")
        if same and state.get("dp_rank") == self.dp_rank:
            self.consumed, self.worker_states = int(state["consumed"]), dict(state["workers"])
            return
        saved = f"{state.get('dp_world')} DP ranks x {state.get('num_workers')} workers"
        now = f"{self.dp_world} x {self.num_workers}"
        if self.data.mode == "exact":
            raise DataError(
                f"{where}: the data order was saved with {saved}, this run has {now}; exact-epoch order cannot be "
                f"split differently mid-epoch. Resume with the same DP size and data.num_workers, or set "
                f"data.mode=resampled (streams restart from fresh, independent draws)"
            )
        # resampled: new independent streams (a new epoch key), the step count and task sequence go on
        epoch = 1 + max([s.get("epoch", 0) for s in state.get("workers", {}).values()] + [0])
        for t in state.get("workers", {}).values():
            for task in t.get("tasks", {}).values():
                epoch = max(epoch, task["window"][0] + 1)
        self.consumed = int(state["consumed"])
        w_count = self.num_workers  # logical worker w serves the steps = w (mod W), in order from here
        self.worker_states = {str(w): {"next_step": self.consumed + (w - self.consumed) % w_count, "epoch": epoch,
                                       "tasks": {}} for w in range(w_count)}
        log.warning("%s: data order saved with %s, now %s: resampled streams restart with fresh draws (epoch key %d)",
                    where, saved, now, epoch)
