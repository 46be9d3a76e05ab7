"""One engine interface, several backends, chosen by name (`engine: hf | megatron | deepspeed`).

The trainer owns the loop (data, logging, signals, the step-N/ layout and its COMPLETE marker); an
engine owns the model: how it is built and sharded, one optimizer step over a list of micro-batches
(forward, backward, gradient sync, clipping, update), what it writes into a checkpoint directory and
how a stage's result becomes an encoder folder. Each backend registers an `EngineSpec` (spec.py).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from toolkit.checkpoint.pending import SaveHandle
from toolkit.config import RunConfig, StageConfig
from toolkit.distributed.parallel_dims import ParallelDims


@dataclass
class StepResult:
    loss: float  # mean loss of the optimizer step (averaged over micro-batches and DP ranks)
    tokens: int  # real tokens processed by this DP replica
    grad_norm: float
    lr: float
    # True when the loss or the global grad norm was non-finite: the update was not applied (weights,
    # optimizer state and LR schedule untouched, gradients zeroed), on every rank alike
    skipped: bool = False


class Engine(ABC):
    name: str = ""  # set by spec.register_engine

    def __init__(self, cfg: RunConfig, dims: ParallelDims):
        self.cfg, self.dims = cfg, dims

    @property
    @abstractmethod
    def tokenizer(self): ...

    @abstractmethod
    def build(self, *, add_mask_token: bool) -> None:
        """Load the backbone (and the frozen MNTP head) onto this rank."""

    @abstractmethod
    def load_stage_output(self, final_dir: Path) -> None:
        """Load a finished stage's merged encoder (stage chaining)."""

    @abstractmethod
    def begin_stage(self, index: int, stage: StageConfig, *, data_kind: str, generator: torch.Generator) -> None:
        """Dropout, adapter / trainable set, optimizer and LR schedule for `stage`."""

    @abstractmethod
    def train_step(self, micro_batches: list[list[dict]]) -> StepResult:
        """One optimizer step over `grad_accum` batches of samples (this DP rank's share)."""

    @abstractmethod
    def save(self, step_dir: Path) -> None:
        """Write model + optimizer state into `step_dir` (every rank calls; a temp dir, marker comes later)."""

    def begin_save(self, step_dir: Path) -> SaveHandle:
        """`save`, as a handle the trainer commits the step by: this default is synchronous; an engine
        with async save (its spec's `async_save`) returns one still writing when asked for it."""
        self.save(step_dir)
        return SaveHandle()

    @abstractmethod
    def load(self, step_dir: Path) -> None:
        """Restore what `save` wrote, possibly at another parallel layout when the backend can reshard."""

    @abstractmethod
    def end_stage(self, final_dir: Path) -> Path:
        """Merge adapters and write the encoder folder (one writer); returns `final_dir`."""

    def local_trainable_tensors(self) -> list[torch.Tensor]:
        """This rank's copies (or shards) of the trainable tensors, for the finiteness check before a save."""
        return list(getattr(self, "params", {}).values())

    def trainable_finite(self) -> bool:
        """Whether every trainable tensor is finite on every rank (a collective: every rank calls)."""
        with torch.no_grad():
            ok = all(bool(torch.isfinite(t).all()) for t in self.local_trainable_tensors() if t.numel())
        return not any_rank(not ok)

    def rng_state(self) -> dict:
        return {}

    def set_rng_state(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------------------------------------- shared
def stage_attention_dropout(stage: StageConfig, cfg: RunConfig, hf_config) -> float:
    """A stage's attention dropout: its own, else the model's override, else the checkpoint's.

    Set at every stage, so one stage's (SimCSE's 0.3) never leaks into the next."""
    return float(next(p for p in (stage.attention_dropout, cfg.model.attention_dropout,
                                  getattr(hf_config, "attention_dropout", 0.0), 0.0) if p is not None))


def nonfinite(*values: float) -> bool:
    return not all(math.isfinite(v) for v in values)


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank of the world (all its DP, TP and PP ranks), so
    no rank applies an update that another skips. A CPU tensor: gloo carries it, also beside nccl."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def allreduce(tensors: list[torch.Tensor], group, *, average: bool, bucket_elements: int = 1 << 26) -> None:
    """Sum (or average) tensors in place over `group`: flat buckets per dtype (DDP's arithmetic,
    without its overlap), so no dtype is promoted and no bucket exceeds `bucket_elements`."""
    if group is None or dist.get_world_size(group) == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        bucket: list[torch.Tensor] = []
        for i, t in enumerate(same):
            bucket.append(t)
            if i == len(same) - 1 or sum(b.numel() for b in bucket) + same[i + 1].numel() > bucket_elements:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=group)
                if average:
                    flat /= dist.get_world_size(group)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket = []


def allreduce_mean(tensors: list[torch.Tensor], group) -> None:
    """Average tensors in place over `group` (gradients over the DP group)."""
    allreduce(tensors, group, average=True)
