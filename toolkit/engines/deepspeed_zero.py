"""The `deepspeed` engine: the hf model, data-parallel under DeepSpeed ZeRO stages 0-3 (+ CPU offload).

The trainer still owns the loop: DeepSpeed runs in its caller-owned accumulation mode
(`managed_gradient_accumulation: false`), so one `train_step` is any number of backward calls
(micro-batches, GradCache chunks, query and passage passes) followed by one `engine.step()` that
reduces, clips and updates. Every forward runs inside DeepSpeed's engine forward and every backward
through `engine.backward` (ZeRO reduces or partitions gradients inside it), never `tensor.backward`:
ZeRO-3 otherwise overwrites, instead of accumulating, the gradients of earlier micro-batches.

Checkpoints are DeepSpeed's own (`step-N/deepspeed/`: per-rank partitions of the fp32 master
weights and Adam moments, frozen weights excluded) plus a `zero.json` naming the layout they need.
Trainable weights are always read back as full fp32 tensors (gathered across partitions first: the
known ZeRO-3 failure is LoRA tensors saved with size 0), so a stage's merged encoder and
`embedforge export` equal what the unsharded model would give. A checkpoint resumed at another DP size
(same ZeRO stage) is converted to DeepSpeed's universal format first (`_load_universal`).

At ZeRO-3 the model is built already partitioned and filled by rank 0 (`zero3_load`): no rank holds
it whole while it loads, at the first stage or at a later stage's start.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from toolkit.assets import cache_dir
from toolkit.checkpoint.integrity import load_torch
from toolkit.config import RunConfig, StageConfig
from toolkit.distributed.parallel_dims import ParallelDims, init_single_process_group
from toolkit.engines.base import StepResult, any_rank, nonfinite
from toolkit.engines.hf import HFEngine
from toolkit.engines.spec import EngineSpec, PlannerTraits, register_engine
from toolkit.engines.zero3_load import load_partitioned, zero3_construction
from toolkit.errors import CheckpointError, MissingPathError
from toolkit.models.bidirectional import check_bidirectional
from toolkit.models.folder import backbone_files, load_head_weights
from toolkit.models.loading import build_encoder
from toolkit.models.stage_encoder import merged_stage_encoder
from toolkit.optim import lr_lambda
from toolkit.run_layout import RunLayout

DS_DIR = "deepspeed"  # DeepSpeed's checkpoint folder inside step-N/
TAG = "state"  # its one tag (step-N/ already names the step)
LAYOUT_FILE = "zero.json"
STALE_BUILD_LOCK_S = 20 * 60  # a JIT build of a DeepSpeed CPU op takes 1-3 minutes on 2 cores
log = logging.getLogger(__name__)


def _import_deepspeed():
    """deepspeed, with its JIT-built CPU ops cached across runs (the shared-memory comm op takes ~30 s once)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
    for lock in remove_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"])):
        log.warning("%s: removed a build lock left by a process killed while compiling a DeepSpeed op", lock)
    import deepspeed

    return deepspeed


def remove_stale_build_locks(extensions_dir: Path, older_than_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """torch's JIT build waits, without end, for the `lock` file of whoever builds an op; a process killed
    mid-build (kill -9, a preempted job) leaves it behind and every later run hangs. A build takes a few
    minutes, so a lock far older than that has no owner left."""
    stale = []
    for lock in extensions_dir.glob("*/lock") if extensions_dir.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):
            if time.time() - lock.stat().st_mtime > older_than_s:
                lock.unlink()
                stale.append(lock)
    return stale


def _deepspeed_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoints (plain state holders, no code on load)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def check_deepspeed_files(folder: Path) -> None:
    """DeepSpeed's `load_checkpoint` and `zero_to_fp32` read with `torch.load(weights_only=False)`
    (DeepSpeed's code): each of its files is first proven plain data under weights_only=True, with
    only DeepSpeed's own state classes allowed, so a crafted file is refused before DeepSpeed reads it."""
    allow = _deepspeed_globals()
    for path in sorted(folder.rglob("*.pt")):
        load_torch(path, allow=allow, mmap=True)


class _TrainModule(nn.Module):
    """What DeepSpeed wraps: the encoder and the frozen MNTP head, so ZeRO-3 partitions both.

    Its forward runs whatever a step computes (`fn(*args)`: an embedding, an MNTP loss) inside
    DeepSpeed's forward, which must see every forward: ZeRO-3 counts them to tell a new
    micro-batch (accumulate) from another pass of the same backward."""

    def __init__(self, encoder: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.encoder, self.lm_head = encoder, lm_head

    def forward(self, fn, *args) -> Tensor:
        return fn(*args)


def ds_config(cfg: RunConfig, stage: StageConfig, dp: int) -> dict:
    """The DeepSpeed config of one stage: our recipe fields mapped, nothing left to DeepSpeed's defaults
    that changes the arithmetic (clipping, accumulation, precision)."""
    z = cfg.zero
    zero: dict = {"stage": z.stage, "overlap_comm": z.overlap_comm, "contiguous_gradients": True,
                  "reduce_bucket_size": z.reduce_bucket_size}
    if z.stage in (1, 2):
        zero["allgather_bucket_size"] = z.allgather_bucket_size
    if z.stage == 3:
        zero["stage3_prefetch_bucket_size"] = z.prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = 0  # partition every parameter, small ones too
        zero["stage3_max_live_parameters"] = z.max_live_parameters
        zero["stage3_max_reuse_distance"] = z.max_reuse_distance
    pin = torch.cuda.is_available()
    if z.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if z.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": stage.data.batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "train_batch_size": stage.data.batch_size * stage.grad_accum * dp,
        "managed_gradient_accumulation": False,  # our trainer owns micro-batches: step() is the boundary
        # ZeRO-0 computes the grad norm only when it clips: an unreachable bound reports it without clipping
        "gradient_clipping": stage.optimizer.clip_grad or (1e30 if z.stage == 0 else 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": stage.precision == "bf16"},
        # bf16 weights: ZeRO 2/3 accumulate gradients in fp32 partitions. (At ZeRO-1 that setting swaps in
        # DeepSpeed's BF16_Optimizer, whose checkpoints its zero_to_fp32 cannot read; ZeRO-0 has no such mode.)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if stage.precision == "bf16" and z.stage >= 2 else {}),
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # torch AdamW may run on offloaded partitions
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(HFEngine):
    """The hf engine's model and stages; DeepSpeed owns gradient reduction, clipping and the update."""

    def __init__(self, cfg: RunConfig, dims: ParallelDims):
        super().__init__(cfg, dims)
        self.ds = None  # the DeepSpeed engine of the current stage

    def _ensure_process_group(self) -> None:
        if self.dims.world_size == 1:
            init_single_process_group()  # DeepSpeed (and zero.Init) need a process group, even of one rank
            os.environ.setdefault("LOCAL_RANK", "0")  # and assert a launcher set this

    def _release(self) -> None:
        if self.ds is not None:
            self.ds.destroy()
            self.ds = None

    def build(self, *, add_mask_token: bool) -> None:
        self._building = 0  # the stage whose DeepSpeed config a ZeRO-3 construction follows
        super().build(add_mask_token=add_mask_token)

    def _load_encoder(self) -> tuple:
        """ZeRO-3: built partitioned, weights read by rank 0 only (`zero3_load`); ZeRO 0-2 keep whole
        weights on every rank anyway, so they load as the hf engine does."""
        if self.cfg.zero.stage != 3:
            return super()._load_encoder()
        self._ensure_process_group()
        _import_deepspeed()
        stage = self.cfg.stages[self._building]
        config = ds_config(self.cfg, stage, self.dims.dp)
        # zero.Init reads the partitioning and the precision it creates weights in (the stage's, or the
        # model's bf16); its batch check runs before DeepSpeed knows the world size, so no batch totals
        config["bf16"] = {"enabled": stage.precision == "bf16" or self.cfg.model.dtype == "bfloat16"}
        for total in ("train_batch_size", "gradient_accumulation_steps"):
            config.pop(total)
        with zero3_construction(config) as gathered:
            return build_encoder(self.cfg.model, self.cfg.pooling, seed=self.cfg.seed,
                                 add_mask_token=self.add_mask_token, partitioned=gathered)

    def load_stage_output(self, final_dir: Path) -> None:
        """A fresh model with the finished stage's merged weights (ZeRO-3 left the last one partitioned
        and hooked); at ZeRO-3 built partitioned again and filled from rank 0's read of the folder."""
        self._release()
        self.encoder = self.lm_head = self.step_fn = None  # the old partitions go before the new ones are built
        self.params = {}
        gc.collect()
        self._building = self._stage_after(final_dir)
        self._build_encoder()
        if self.cfg.zero.stage != 3:
            return super().load_stage_output(final_dir)
        load_partitioned(self.encoder.backbone, backbone_files(final_dir), rank=self.dims.rank, source=final_dir)
        load_head_weights(self.encoder, final_dir)  # pooling / IEM: small, whole until DeepSpeed partitions them

    def _stage_after(self, final_dir: Path) -> int:
        layout = RunLayout(Path(self.cfg.output_dir))
        for index, stage in enumerate(self.cfg.stages):
            if layout.final_dir(index, stage.name).resolve() == Path(final_dir).resolve():
                return index + 1
        raise RuntimeError(f"{final_dir}: not the final folder of any stage of this run")

    def begin_stage(self, index: int, stage: StageConfig, *, data_kind: str, generator: torch.Generator) -> None:
        deepspeed = _import_deepspeed()
        if stage.precision == "bf16" and self.cfg.zero.stage == 0 and self.dims.rank == 0:
            log.warning("stage %s: ZeRO-0 with bf16 accumulates and all-reduces gradients in bf16 (DeepSpeed has "
                        "no fp32 accumulation without ZeRO); zero.stage >= 2 accumulates in fp32", stage.name)
        self._ensure_process_group()
        self._prepare_trainable(index, stage)
        optimizer = self._make_optimizer(stage)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage.schedule, stage.steps))
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=_TrainModule(self.encoder, self.lm_head), optimizer=optimizer, lr_scheduler=scheduler,
            config=ds_config(self.cfg, stage, self.dims.dp), dist_init_required=False)
        self._build_step(stage, data_kind, generator)
        self.step_fn.forward = self.ds
        self.step_fn.backward = self._backward
        self._stage0_norm: float | None = None
        if self.cfg.zero.stage == 0:  # no ZeRO optimizer records the norm: keep the clip's return value
            self.ds.clip_fp32_gradients = self._clip_and_record
        self._install_skip_gate()
        if self.cfg.zero.stage == 3 and self.encoder.spec.bidirectional:
            with torch.no_grad():  # the proof the hf engine runs at build: a partitioned model runs in its engine
                self.ds(check_bidirectional, self.encoder.backbone)
        self.ds.train()

    def _install_skip_gate(self) -> None:
        """Make DeepSpeed's step() skip the update on a non-finite loss or grad norm, before it applies it.

        The grad norm is only known inside step() (ZeRO 1-3 reduce / partition gradients in backward and
        take the norm of the partitions there), so the skip goes through DeepSpeed's own overflow path:
        gradients cleared, no optimizer step, `optimizer.overflow` set so the engine leaves the LR
        schedule alone (and counts `skipped_steps`). DeepSpeed 0.19: ZeRO 1/2 flag a non-finite norm
        themselves for fp32 and check raw gradients only with `check_grad_overflow` (turned on here, also
        for bf16); ZeRO-3 flags an invalid norm for every dtype. A non-finite loss (known before step(),
        reduced over DP) forces the same path. ZeRO-0 has no ZeRO optimizer: the torch optimizer's
        step() is gated on the norm its clip recorded."""
        opt = self.ds.optimizer
        self._loss_bad = False
        stage = self.cfg.zero.stage
        if stage in (1, 2):
            opt.check_grad_overflow = True
            has_overflow = opt.has_overflow

            def gated_has_overflow(*args, **kwargs):
                return bool(has_overflow(*args, **kwargs)) or self._loss_bad

            opt.has_overflow = gated_has_overflow
        elif stage == 3:
            check = opt._overflow_check_and_loss_scale_update

            def gated_check(*args, **kwargs):
                check(*args, **kwargs)
                opt.overflow = bool(opt.overflow) or self._loss_bad
                return opt.overflow

            opt._overflow_check_and_loss_scale_update = gated_check
        else:
            step = opt.step

            def gated_step(*args, **kwargs):
                norm = self._stage0_norm if self._stage0_norm is not None else 0.0
                opt.overflow = any_rank(self._loss_bad or nonfinite(norm))
                if opt.overflow:  # the engine zeroes the gradients after step() and skips the LR schedule
                    return None
                return step(*args, **kwargs)

            opt.step = gated_step

    def _make_optimizer(self, stage: StageConfig) -> torch.optim.Optimizer:
        if not self.cfg.zero.cpu_adam:
            return super()._make_optimizer(stage)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        o = stage.optimizer
        return DeepSpeedCPUAdam(list(self.params.values()), lr=o.lr, betas=o.betas, eps=o.eps,
                                weight_decay=o.weight_decay, adamw_mode=True)

    def _clip_and_record(self) -> None:
        from deepspeed.runtime.utils import clip_grad_norm_

        self._stage0_norm = float(clip_grad_norm_(parameters=self.ds.module.parameters(),
                                                  max_norm=self.ds.gradient_clipping(), mpu=self.ds.mpu))

    def _backward(self, loss: Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the step already scaled by 1 / grad_accum

    def train_step(self, micro_batches: list[list[dict]]) -> StepResult:
        loss, tokens = self._forward_backward(micro_batches)  # loss reduced over DP: the same on every rank
        self._loss_bad = any_rank(nonfinite(loss))
        self._stage0_norm = None
        skipped_before = self.ds.skipped_steps
        self.ds.step()  # reduce (stage 0/1) or finalize partitions (2/3), clip, update, lr schedule; or skip
        skipped = any_rank(self.ds.skipped_steps > skipped_before or self._loss_bad)
        self._loss_bad = False
        norm = self.ds.get_global_grad_norm()  # ZeRO and bf16 optimizers record it (inf on a skip); ZeRO-0 not
        norm = self._stage0_norm if norm is None else norm
        grad_norm = float(norm) if norm is not None else float("nan")
        return StepResult(loss=loss, tokens=tokens, grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0],
                          skipped=skipped)

    def local_trainable_tensors(self) -> list[Tensor]:
        """This rank's trainable values: the ZeRO-3 partition (the parameter itself is empty there), else
        the parameter (ZeRO 0-2 keep full copies on every rank)."""
        return [getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None else p
                for p in self.params.values()]

    # ------------------------------------------------------------------ checkpoints
    def _layout(self) -> dict:
        z = self.cfg.zero
        return {"zero_stage": z.stage, "dp": self.dims.dp, "bf16": self.stage.precision == "bf16",
                "offload_optimizer": z.offload_optimizer, "offload_params": z.offload_params,
                "trainable": list(self.params)}  # names in optimizer order (read_trainable keeps only these)

    def save(self, step_dir: Path) -> None:
        """DeepSpeed's checkpoint (every rank writes its partitions; frozen weights are rebuilt from
        the recipe, so they are not written) and the layout it can be loaded at."""
        folder = step_dir / DS_DIR
        self.ds.save_checkpoint(str(folder), tag=TAG, save_latest=False, exclude_frozen_parameters=True)
        if self.dims.rank == 0:
            (folder / LAYOUT_FILE).write_text(json.dumps(self._layout(), indent=2, sort_keys=True))

    def load(self, step_dir: Path) -> None:
        """Resume from `step-N/deepspeed/`: directly at the saved layout, or through DeepSpeed's universal
        checkpoint when only the DP size changed (ZeRO 1-3); other layout changes are refused (`universal_refusal`)."""
        folder = step_dir / DS_DIR
        layout_file = folder / LAYOUT_FILE
        if not layout_file.is_file():
            raise MissingPathError(f"{layout_file}: missing (was this checkpoint written by engine=deepspeed?)")
        saved, now = json.loads(layout_file.read_text()), self._layout()
        fixed = ("zero_stage", "dp", "bf16") if saved["zero_stage"] > 0 else ("zero_stage", "bf16")
        differ = {k: (saved.get(k), now[k]) for k in fixed if saved.get(k) != now[k]}
        if not differ:
            check_deepspeed_files(folder)  # plain data before DeepSpeed unpickles it
            load_path, _ = self.ds.load_checkpoint(str(folder), tag=TAG, load_module_strict=False,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
            if load_path is None:
                raise MissingPathError(f"{folder}: DeepSpeed found no checkpoint tagged {TAG!r}")
            return
        changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differ.items())
        why = universal_refusal(saved, now)
        if why:
            raise CheckpointError(
                f"{layout_file}: this DeepSpeed checkpoint holds ZeRO partitions for another layout ({changes}) and "
                f"DeepSpeed's universal checkpoint cannot convert it here: {why}; resume with "
                f"zero.stage={saved['zero_stage']} on {saved['dp']} data-parallel ranks, or "
                f"`embedforge export --checkpoint {step_dir}` and start a new stage from the exported folder")
        log.warning("%s: resuming a ZeRO checkpoint at another layout (%s) through DeepSpeed's universal checkpoint",
                    step_dir, changes)
        check_deepspeed_files(folder)  # plain data before DeepSpeed's converter unpickles it
        self._load_universal(step_dir)

    def _load_universal(self, step_dir: Path) -> None:
        """Rank 0 converts `step-N/deepspeed/` into DeepSpeed's universal format (full fp32 masters and Adam
        moments per parameter), in a hidden sibling of the step folder (the step folder stays as committed);
        every rank then loads and re-partitions it for this layout; the conversion is removed afterwards."""
        universal = step_dir.parent / f".{step_dir.name}.deepspeed-universal"
        error = None
        if self.dims.rank == 0:
            try:
                convert_to_universal(step_dir / DS_DIR / TAG, universal / TAG)
            except Exception as e:  # noqa: BLE001 - told to every rank below, raised on all of them
                error = e
        failed = any_rank(error is not None)  # also the barrier: the conversion is complete before anyone reads it
        if failed:
            if error is not None:
                raise error
            raise CheckpointError(f"{step_dir}: rank 0 failed to convert the DeepSpeed checkpoint to a universal one")
        config = self.ds._config
        config.load_universal_checkpoint = True
        try:
            load_path, _ = self.ds.load_checkpoint(str(universal), tag=TAG, load_module_strict=False,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            config.load_universal_checkpoint = False
            if dist.is_initialized():
                dist.barrier()
            if self.dims.rank == 0:
                shutil.rmtree(universal, ignore_errors=True)
        if load_path is None:
            raise MissingPathError(f"{universal}: DeepSpeed found no universal checkpoint tagged {TAG!r}")

    def trainable_state(self) -> dict[str, Tensor]:
        """Full fp32 values of the trainable tensors (a collective under ZeRO-3: every rank calls).

        Read from the optimizer's fp32 master copies where DeepSpeed keeps them (bf16, ZeRO 1-3),
        gathered across partitions."""
        from deepspeed.utils import safe_get_full_fp32_param

        opt = self.ds.optimizer  # ZeRO-0 with bf16: DeepSpeed's unfused optimizer keeps a master per param
        masters = {id(low): high for lows, highs in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
                   for low, high in zip(lows, highs)}
        state = {}
        for name, p in self.params.items():
            full = safe_get_full_fp32_param(p)
            if full is None:
                full = masters.get(id(p), p.detach())
            state[name] = full.float().cpu().clone()
        return state

    def end_stage(self, final_dir: Path) -> Path:
        """Gather the trainable tensors, then one rank rebuilds the stage's starting model unsharded,
        loads them, merges the adapter and writes the encoder folder."""
        trainable = self.trainable_state()
        self._release()  # partitions, masters and moments go before rank 0 rebuilds the model unsharded
        if self.dims.rank == 0:
            encoder, _ = merged_stage_encoder(self.cfg, self.index, RunLayout(Path(self.cfg.output_dir)), trainable,
                                              source=f"stage {self.stage.name}")
            encoder.save_pretrained(final_dir)
        if dist.is_initialized():
            dist.barrier()
        return final_dir


def universal_refusal(saved: dict, now: dict) -> str | None:
    """Why a saved ZeRO layout cannot be resumed at `now` through a universal checkpoint (None: it can).

    DeepSpeed 0.19.8, measured with this trainer: a DP size change at ZeRO 2 and ZeRO 3 resumes exactly
    (2 -> 4 ranks; the same code paths serve ZeRO 1). A ZeRO stage change does not: its model-state
    files are named per stage (ZeRO-3 `zero_pp_rank_*_mp_rank_00_model_states.pt`, ZeRO 1/2
    `mp_rank_00_model_states.pt`) and the universal loader at the other stage finds none (an
    AssertionError in its state-dict loader). Resuming on 1 rank (ZeRO 2, DP 2 -> 1, and ZeRO 2 -> 1)
    hung. ZeRO-0 has no ZeRO optimizer."""
    a, b = saved["zero_stage"], now["zero_stage"]
    if a != b:
        if 0 in (a, b):
            return ("ZeRO-0 has no ZeRO optimizer: DeepSpeed neither writes partitioned optimizer states there nor "
                    "loads universal ones")
        return (f"DeepSpeed {_ds_version()} cannot load a universal checkpoint at another ZeRO stage "
                f"({a} -> {b}); it can at another DP size at the same stage")
    if now["dp"] == 1:
        return ("resuming on a single rank through the universal checkpoint hung in our tests with DeepSpeed "
                f"{_ds_version()} (not diagnosed), so it is not attempted; resume on 2 or more ranks")
    if saved.get("bf16") != now["bf16"]:
        return "bf16 <-> fp32 changes the optimizer DeepSpeed builds (and the fingerprinted stage precision)"
    if saved.get("trainable") is not None and saved["trainable"] != now["trainable"]:
        return "the trainable tensors differ"
    return None


def _ds_version() -> str:
    try:
        from importlib.metadata import version

        return version("deepspeed")
    except Exception:  # noqa: BLE001 - only for a message
        return "(this version)"


def convert_to_universal(tag_dir: Path, output: Path) -> Path:
    """DeepSpeed's converter (`deepspeed.checkpoint.ds_to_universal`) on one tag folder, in a subprocess,
    written to `output.tmp` and renamed to `output` (a half-written conversion is never read)."""
    tmp = output.with_name(output.name + ".tmp")
    for stale in (tmp, output):
        shutil.rmtree(stale, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    _import_deepspeed()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]  # our module records no universal-checkpoint info (no TP / PP to merge)
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{tag_dir}: DeepSpeed's universal checkpoint conversion failed: "
                              f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    os.replace(tmp, output)
    return output


def read_trainable(step_dir: Path) -> dict[str, Tensor]:
    """The trainable tensors of a `step-N/` DeepSpeed checkpoint as full fp32 tensors, offline, in one
    process, whatever the number of ranks that wrote it (DeepSpeed's zero_to_fp32 for ZeRO 1-3)."""
    folder = step_dir / DS_DIR
    layout_file = folder / LAYOUT_FILE
    if not layout_file.is_file():
        raise MissingPathError(f"{layout_file}: missing from a checkpoint marked complete")
    layout = json.loads(layout_file.read_text())
    names = layout["trainable"]
    _import_deepspeed()
    check_deepspeed_files(folder)
    prefix = "encoder."
    if layout["zero_stage"] == 0:
        states = folder / TAG / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise MissingPathError(f"{states}: missing from a ZeRO-0 checkpoint")
        saved = load_torch(states, allow=_deepspeed_globals())
        masters = [t for group in (saved.get("optimizer") or {}).get("fp32_groups", []) for t in group]
        if masters:  # bf16: the fp32 master weights, in the optimizer's (= `trainable`'s) order
            if len(masters) != len(names):
                raise CheckpointError(f"{states}: {len(masters)} fp32 master weights for {len(names)} trainable tensors "
                                      f"({layout_file})")
            return {name: m.float() for name, m in zip(names, masters)}
        module = saved["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG, exclude_frozen_parameters=True)
    missing = [n for n in names if prefix + n not in module]
    if missing:
        raise CheckpointError(f"{folder}: trainable tensors {missing[:3]} are missing from the DeepSpeed checkpoint")
    return {n: module[prefix + n].float() for n in names}  # buffers and other entries left out


def export_step(cfg: RunConfig, index: int, step_dir: Path, output: Path) -> Path:
    """A `step-N/` of this engine: its ZeRO partitions read back as full fp32 tensors, merged into the
    stage's rebuilt start."""
    encoder, _ = merged_stage_encoder(cfg, index, RunLayout.of_stage_dir(step_dir.parent), read_trainable(step_dir),
                                      source=str(step_dir))
    return encoder.save_pretrained(output)


def zero_partition(cfg: RunConfig, dp: int, weights: float, grads: float, optim: float,
                   notes: list[str]) -> tuple[float, float, float]:
    """Planner hook: (weights, gradients, optimizer) bytes per GPU under ZeRO: stage 1 partitions the
    optimizer states over the dp ranks, 2 the gradients too, 3 the weights too; offloaded parts leave the GPU."""
    z = cfg.zero
    if z.stage >= 1:
        optim /= dp
    if z.stage >= 2:
        grads /= dp
    if z.stage == 3:
        weights /= dp
    if z.offload_optimizer == "cpu":
        notes.append(f"zero: {optim / 2**30:.2f} GiB of optimizer states per rank live in host memory")
        optim = 0.0
    if z.offload_params == "cpu":
        notes.append(f"zero: {weights / 2**30:.2f} GiB of weights per rank live in host memory")
        weights = 0.0
    return weights, grads, optim


SPEC = register_engine(EngineSpec(
    name="deepspeed", engine_cls=DeepSpeedEngine, parallel_dims=frozenset({"dp"}), export_step=export_step,
    devices=frozenset({"cpu", "cuda"}),
    planner=PlannerTraits(bf16_keeps_bf16_weights=True, partition=zero_partition,
                          gathers_layer_weights=lambda cfg: cfg.zero.stage == 3),
    trajectory_settings=lambda cfg: {"zero": {"stage": cfg.zero.stage}},
))
