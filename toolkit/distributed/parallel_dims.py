"""ParallelDims: how the world splits into data / tensor / pipeline (/ context) parallel groups.

One object answers "which group do I talk to" for every collective, so no code reaches for the world
group by accident: contrastive negatives and loss averaging use `dp_group`, tensor-parallel math
uses `tp_group`, pipeline sends use megatron's pipeline groups. The rank order matches
megatron-core's default ("tp-cp-ep-dp-pp": TP fastest), so `initialize_megatron()` builds the same
groups megatron's layers expect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from toolkit.config import ConfigError, ParallelConfig
from toolkit.distributed import megatron_shims
from toolkit.errors import InputError


@dataclass(kw_only=True)
class ParallelDims:
    dp: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    world_size: int = 1
    rank: int = 0
    _groups: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if self.cp != 1:
            raise ConfigError("parallel.cp: context parallelism is reserved and must be 1")
        product = self.dp * self.tp * self.pp * self.cp
        if product != self.world_size:
            raise ConfigError(
                f"parallel: dp({self.dp}) x tp({self.tp}) x pp({self.pp}) x cp({self.cp}) = {product} "
                f"!= world size {self.world_size}; fix parallel.* or the number of processes"
            )

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, rank: int) -> "ParallelDims":
        model_parallel = cfg.tp * cfg.pp * cfg.cp
        if world_size % model_parallel:
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by tp({cfg.tp}) x pp({cfg.pp}) x cp({cfg.cp})"
            )
        dp = cfg.dp or world_size // model_parallel
        return cls(dp=dp, tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, world_size=world_size, rank=rank)

    @classmethod
    def model_parallel_groups(cls, tp: int, pp: int, world_size: int, rank: int, *, what: str) -> "ParallelDims":
        """Inference (teacher scoring, evaluation) at `tp` x `pp`: the world as groups of tp x pp ranks,
        one model each; `what` names the command in the one-line refusal of a layout the world cannot hold."""
        if tp < 1 or pp < 1:
            raise InputError(f"{what}: --tp {tp} / --pp {pp}: must be >= 1")
        if world_size % (tp * pp):
            raise InputError(f"{what}: --tp {tp} x --pp {pp} does not divide the {world_size} ranks"
                             + ("" if world_size > 1 else " (run it under torchrun)"))
        return cls.from_config(ParallelConfig(tp=tp, pp=pp), world_size, rank)

    # ------------------------------------------------------------------ coordinates (tp fastest, pp slowest)
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp * self.cp)) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.cp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """Rank 0 logs and writes shared files; it is always on the first pipeline stage."""
        return self.rank == 0

    def rank_of(self, *, dp: int, tp: int, pp: int) -> int:
        return ((pp * self.dp + dp) * self.cp) * self.tp + tp

    @property
    def group_writer_rank(self) -> int:
        """The rank of this rank's model-parallel (tp x pp) group that holds the group's outputs and
        writes them: last pipeline stage, TP rank 0."""
        return self.rank_of(dp=self.dp_rank, tp=0, pp=self.pp - 1)

    @property
    def is_group_writer(self) -> bool:
        return self.rank == self.group_writer_rank

    @property
    def last_stage_rank(self) -> int:
        """The rank holding this rank's (dp, tp) position on the last pipeline stage."""
        return self.rank_of(dp=self.dp_rank, tp=self.tp_rank, pp=self.pp - 1)

    # ------------------------------------------------------------------ groups
    def _ranks(self, axis: str) -> list[list[int]]:
        coords = [(d, t, p) for p in range(self.pp) for d in range(self.dp) for t in range(self.tp)]
        key = {"dp": lambda c: (c[1], c[2]), "tp": lambda c: (c[0], c[2]), "pp": lambda c: (c[0], c[1]),
               "mp": lambda c: (c[0],)}[axis]
        groups: dict[tuple, list[int]] = {}
        for d, t, p in coords:
            groups.setdefault(key((d, t, p)), []).append(self.rank_of(dp=d, tp=t, pp=p))
        return [sorted(g) for g in groups.values()]

    def group(self, axis: str):
        """The process group of `axis` ("dp", "tp", "pp", "mp" = tp x pp) containing this rank.

        Built once (every rank takes part in creating every group, as torch requires). Without an
        initialised process group, returns None (single process: no collective runs).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if not self._groups:
            for name in ("dp", "tp", "pp", "mp"):
                for ranks in self._ranks(name):
                    pg = dist.new_group(ranks)
                    if self.rank in ranks:
                        self._groups[name] = pg
        return self._groups[axis]

    @property
    def dp_group(self):
        return self.group("dp")

    @property
    def tp_group(self):
        return self.group("tp")

    def initialize_megatron(self, seed: int) -> None:
        """megatron-core's parallel_state for these dims (+ CPU shims without CUDA), seeded TP RNG."""
        megatron_shims.apply()
        from megatron.core import parallel_state

        if self.world_size == 1:
            init_single_process_group()  # megatron's groups need a process group even for one rank

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
            context_parallel_size=self.cp,
            # a fake process group (the dry run's, toolkit.dry_run) cannot back real gloo groups
            create_gloo_process_groups=dist.get_backend() != "fake",
        )
        if parallel_state.get_data_parallel_world_size() != self.dp:
            raise RuntimeError(f"megatron built dp={parallel_state.get_data_parallel_world_size()}, expected {self.dp}")
        if parallel_state.get_tensor_model_parallel_rank() != self.tp_rank or \
                parallel_state.get_pipeline_model_parallel_rank() != self.pp_rank:
            raise RuntimeError("megatron's rank layout differs from ParallelDims' (tp fastest, pp slowest)")
        megatron_shims.seed_model_parallel_rng(seed, self.tp_rank)


def init_single_process_group() -> None:
    """A one-rank gloo group (megatron and dist_checkpointing need one) over an in-process store: no
    port, and no launcher environment (under `torchrun --nproc-per-node 1` a tcp:// init would wait
    for torchrun's agent store instead of serving its own)."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():  # DeepSpeed's collectives on CUDA tensors need nccl, as with several ranks
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed from torchrun/SLURM-style env vars when set.

    gloo without CUDA; gloo + nccl with it. A single process runs without a process group (the
    megatron engine makes a one-rank one itself).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        # With GPUs: NCCL for CUDA tensors and gloo for the CPU ones (loader / stop flags, object gathers).
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()
