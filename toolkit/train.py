"""The training loop: stages in order, each a LoRA (or full) fine-tune with its own objective.

Stage chaining follows LLM2Vec: a finished stage's adapter is merged and the merged encoder saved
to `<run>/<NN>-<stage>/final/` (a sentence-transformers folder); the next stage adds a new adapter
on top. The loop is the same for every engine (`engine: hf | megatron`, toolkit/engines): it reads
this DP rank's shards, hands the engine one optimizer step's batches, logs, and writes `step-N/`
checkpoints (engine state + per-DP-replica data order and RNG) with exact resume (weights
bit-identical on CPU with the same layout; resharded by the megatron engine at another layout).

This module knows no launcher: no Ray, no SLURM. A SIGTERM/SIGUSR2 only sets a flag; the loop
saves at the next step boundary and returns. So does a near wall-time limit, given as a deadline in
EMBEDFORGE_DEADLINE by whichever launcher knows it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file

from data_pipelines.loader import StreamingLoader, open_dataset
from toolkit.assets import model_config_file
from toolkit.checkpoint.integrity import NUMPY_ARRAY_GLOBALS, load_torch
from toolkit.checkpoint.manager import (begin_step_dir, commit_step_dir, disk_full_guard, newest_verified, read_meta,
                                        verify_checkpoint)
from toolkit.config import ConfigError, RunConfig, ScheduleConfig, StageConfig, to_dict
from toolkit.distributed.parallel_dims import ParallelDims, init_distributed
from toolkit.engines.spec import DEFAULT_ENGINE, build_engine, engine_spec, validate_run
from toolkit.models.arch import ModelArgs, read_model_args
from toolkit.run_layout import STOP_REQUEST, STOPPED, RunLayout
from toolkit.seeds import mask_seed, seed_everything, stage_seed
from toolkit.models.encoder import SPEC_FILE, Encoder, load_iem_weights, load_spec
from toolkit.training_log import TrainingLog

log = logging.getLogger(__name__)
DEADLINE_ENV = "EMBEDFORGE_DEADLINE"


@dataclass
class StageOutcome:
    name: str
    final_dir: Path | None  # None when the stage stopped early (checkpoint saved)
    steps_done: int
    last_loss: float | None


def lr_lambda(schedule: ScheduleConfig, total_steps: int):
    """Multiplier on the base lr: linear warmup, then linear / cosine decay to min_lr_ratio."""

    def fn(step: int) -> float:
        if schedule.warmup_steps and step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        if schedule.decay == "constant":
            return 1.0
        span = max(1, total_steps - schedule.warmup_steps)
        progress = min(1.0, (step - schedule.warmup_steps) / span)
        decay = 1 - progress if schedule.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * decay

    return fn


def stage_fingerprint(stage: StageConfig) -> str:
    """Hash of everything that shapes a stage's trajectory except its length (`steps`)."""
    data = {k: v for k, v in asdict(stage).items() if k != "steps"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StopFlag:
    """Set by SIGTERM / SIGUSR2 (preemption notices); checked at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def install(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR2):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("signal %s received: saving a checkpoint at the next step boundary", signum)
        self.requested = True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


class Trainer:
    """Runs the stages of a recipe on one rank; every rank of a torchrun / SLURM / Ray job runs one."""

    def __init__(self, cfg: RunConfig, resume: Literal["auto", "never"] | str = "auto"):
        self.cfg = cfg
        self.resume = resume
        self.out = Path(cfg.output_dir)
        self.layout = RunLayout(self.out)
        self.stop = StopFlag()
        self.stop_after_steps: int | None = None  # stop (with a checkpoint) after this many steps in this process
        self.deadline = _deadline_from_env()  # the job's end (unix seconds), from the launcher
        self.slowest_step = 0.0

    # ------------------------------------------------------------------ run
    def run(self) -> list[StageOutcome]:
        model_args = preflight(self.cfg)  # a refused recipe or a bad data path fails before any weight loads
        rank, world = init_distributed()
        self.dims = ParallelDims.from_config(self.cfg.parallel, world, rank)
        if self.dims.is_logging_rank:
            self.out.mkdir(parents=True, exist_ok=True)
            self.layout.config_file.write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        seed_everything(self.cfg.seed)
        needs_new_mask = any(
            s.objective.kind == "mntp" and s.objective.mntp.mask_token == "new" for s in self.cfg.stages
        )
        self.engine = build_engine(self.cfg, self.dims, model_args)
        self.engine.build(add_mask_token=needs_new_mask)
        outcomes: list[StageOutcome] = []
        previous_final: Path | None = None
        self.stop.install()
        try:
            for index, stage in enumerate(self.cfg.stages):
                stage_dir = self.layout.stage_dir(index, stage.name)
                final = self.layout.final_dir(index, stage.name)
                if (final / SPEC_FILE).is_file() and self.resume != "never":
                    log.info("stage %s already complete: %s", stage.name, final)
                    outcomes.append(StageOutcome(stage.name, final, stage.steps, None))
                    previous_final = final
                    continue
                if previous_final is not None:
                    self.engine.load_stage_output(previous_final)
                outcome = self._run_stage(index, stage, stage_dir)
                outcomes.append(outcome)
                if outcome.final_dir is None:
                    break
                previous_final = outcome.final_dir
        finally:
            self.stop.uninstall()
        return outcomes

    # ------------------------------------------------------------------ one stage
    def _run_stage(self, index: int, stage: StageConfig, stage_dir: Path) -> StageOutcome:
        dims, engine = self.dims, self.engine
        seed = stage_seed(self.cfg.seed, index)
        seed_everything(seed)
        manifest = open_dataset(stage.data.path)
        loader = StreamingLoader(manifest, stage.data, seed=seed, tokenizer=engine.tokenizer,
                                 dp_rank=dims.dp_rank, dp_world=dims.dp)
        generator = torch.Generator().manual_seed(mask_seed(self.cfg.seed, index, dims.dp_rank))
        engine.begin_stage(index, stage, data_kind=manifest.kind, generator=generator)

        step = 0
        checkpoint = self._resume_point(stage_dir)
        if checkpoint is not None:
            step = self._restore(checkpoint, stage, generator, loader)
            log.info("stage %s: resumed from %s (step %d)", stage.name, checkpoint, step)

        def save(at_step: int) -> Path:
            tmp = begin_step_dir(stage_dir, at_step, dims.rank, self.cfg.checkpoint.keep_last)
            with disk_full_guard(tmp):
                engine.save(tmp)
                trainer_dir = tmp / "trainer"
                if dims.tp_rank == 0 and dims.pp_rank == 0:  # one writer per DP replica: data order + RNG
                    trainer_dir.mkdir(exist_ok=True)
                    torch.save({"rng": _rng_state(generator), "loader": loader.state_dict()},
                               trainer_dir / f"dp-{dims.dp_rank}.pt")
                engine_rng = engine.rng_state()
                if engine_rng:
                    trainer_dir.mkdir(exist_ok=True)
                    torch.save(engine_rng, trainer_dir / f"rank-{dims.rank}.pt")
                meta = {"stage": stage.name, "step": at_step, "fingerprint": stage_fingerprint(stage),
                        "engine": engine.name, "layout": {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp}}
                return commit_step_dir(tmp, meta, dims.rank, self.cfg.checkpoint.keep_last)

        logging_cfg = self.cfg.logging if dims.is_logging_rank else replace(
            self.cfg.logging, tensorboard=False, progress=False)
        tlog = TrainingLog(self.out, stage.name, stage.steps, logging_cfg, start_step=step,
                           write_metrics=dims.is_logging_rank)
        batches = iter(loader)
        last_loss, steps_this_run = None, 0
        try:
            while step < stage.steps:
                t0 = time.perf_counter()
                result = engine.train_step([next(batches) for _ in range(stage.grad_accum)])
                step += 1
                steps_this_run += 1
                seconds = time.perf_counter() - t0
                self.slowest_step = max(self.slowest_step, seconds)
                last_loss = result.loss
                tlog.step(step, result.loss, result.lr, result.tokens, seconds, result.grad_norm)
                if not math.isfinite(result.loss):
                    save(step)
                    raise FloatingPointError(f"stage {stage.name}: loss is {result.loss} at step {step} (checkpoint saved)")
                every = self.cfg.checkpoint.every_steps
                preempted = self._agreed_stop(steps_this_run)
                if step < stage.steps and (preempted or (every and step % every == 0)):
                    path = save(step)
                    if preempted:
                        log.warning("stage %s: stopped at step %d; resume from %s", stage.name, step, path)
                        return StageOutcome(stage.name, None, step, last_loss)
        finally:
            batches.close()  # stops loader workers
            tlog.close()
            bad = loader.stats()
            if bad.num_bad:
                log.warning("stage %s: skipped %d bad records of %d read (%s)", stage.name, bad.num_bad,
                            bad.good + bad.num_bad, bad.bad)

        final = engine.end_stage(self.layout.final_dir(index, stage.name))
        log.info("stage %s: done, merged encoder saved to %s", stage.name, final)
        return StageOutcome(stage.name, final, step, last_loss)

    # ------------------------------------------------------------------ helpers
    def _agreed_stop(self, steps_this_run: int) -> bool:
        """A preemption signal may reach only some ranks: all stop together (or none does)."""
        wanted = (self.stop.requested or (self.stop_after_steps is not None and steps_this_run >= self.stop_after_steps)
                  or self._near_deadline() or self._stop_requested_by_file())
        if self.dims.world_size == 1:
            return wanted
        flag = torch.tensor([int(wanted)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _stop_requested_by_file(self) -> bool:
        """`touch <output_dir>/STOP_REQUESTED`: a graceful stop any launcher (or person) can ask for,
        e.g. a Ray driver relaying a preemption notice its actors never receive."""
        if self.dims.rank != 0 or not (self.out / STOP_REQUEST).exists():  # rank 0 looks: the flag is all-reduced
            return False
        log.warning("%s found: saving a checkpoint and stopping", self.out / STOP_REQUEST)
        return True

    def _near_deadline(self) -> bool:
        if self.deadline is None:
            return False
        left = self.deadline - time.time()
        if left > self.cfg.checkpoint.deadline_margin_s + 2 * self.slowest_step:
            return False
        log.warning("%.0f s left before the job's time limit (%s): saving a checkpoint and stopping", left, DEADLINE_ENV)
        return True

    def _resume_point(self, stage_dir: Path) -> Path | None:
        if self.resume == "never":
            return None
        if self.resume == "auto":
            return newest_verified(stage_dir)
        path = Path(self.resume)
        return path if path.parent == stage_dir else None

    def _restore(self, path: Path, stage: StageConfig, generator: torch.Generator, loader: StreamingLoader) -> int:
        verify_checkpoint(path)  # every file as written, before anything reads one
        meta = read_meta(path)
        if meta.get("fingerprint") != stage_fingerprint(stage):
            raise ConfigError(
                f"{path}: checkpoint was written with a different configuration of stage {stage.name!r} "
                "(objective, data, lora, optimizer, schedule, batch or precision changed); "
                "resume with the same config, or start a new output_dir"
            )
        written_by = meta.get("engine", DEFAULT_ENGINE)
        if written_by != self.engine.name:
            raise ConfigError(f"{path}: written by engine={written_by!r}, this run uses engine={self.engine.name!r}; "
                             f"export it (`embedforge export`) and start a new stage instead")
        self.engine.load(path)
        dims = self.dims
        saved = meta.get("layout", {"dp": 1, "tp": 1, "pp": 1})
        layout = {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp}
        own = path / "trainer" / f"dp-{dims.dp_rank}.pt"
        state = load_torch(own if own.is_file() else path / "trainer" / "dp-0.pt", allow=NUMPY_ARRAY_GLOBALS)
        _set_rng_state(state["rng"], generator)
        loader.load_state_dict(state["loader"], where=str(path))
        engine_rng = path / "trainer" / f"rank-{dims.rank}.pt"
        if saved != layout:
            log.warning("%s: saved at %s, resuming at %s (weights and optimizer resharded)", path, saved, layout)
        elif engine_rng.is_file():
            self.engine.set_rng_state(load_torch(engine_rng))
        return int(meta["step"])


def _rng_state(generator: torch.Generator) -> dict:
    """Every RNG as tensors and plain values, so the file loads with `torch.load(weights_only=True)`
    (numpy's state holds an ndarray: its keys are stored as a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": [version, list(internal), gauss]}


def _set_rng_state(rng: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    numpy_state = rng["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple: written before the tensor form (loaded via NUMPY_ARRAY_GLOBALS)
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(rng["generator"])


def load_encoder_weights(encoder: Encoder, folder: Path) -> None:
    """Load a finished stage's merged backbone (and pooling head) into the live encoder."""
    encoder.backbone.load_state_dict(load_file(str(folder / "model.safetensors")))
    load_head_weights(encoder, folder)


def load_head_weights(encoder: Encoder, folder: Path) -> None:
    """The heads beside the backbone: the pooling head and, for a D2LLM student, its IEM."""
    load_pooling_weights(encoder.pooling, folder)
    spec = load_spec(folder / SPEC_FILE)
    if spec.iem_hidden:
        encoder.add_iem(spec.iem_hidden)
        load_iem_weights(encoder, folder)


def load_pooling_weights(pooling, folder: Path) -> None:
    """A trained pooling head from an encoder folder (no-op for parameter-free heads)."""
    pooling_file = folder / "1_Pooling" / "model.safetensors"
    if pooling.has_parameters and pooling_file.is_file():
        state = {k.removeprefix("pooling."): v for k, v in load_file(str(pooling_file)).items()}
        pooling.load_state_dict(state)


def preflight(cfg: RunConfig, *, check_data: bool = True) -> ModelArgs | None:
    """Everything that can refuse a recipe before any weight is read: the engine's checks (against the
    model's config.json when it is on disk) and, unless a launcher submits for another machine, the
    data paths. Returns the model's ModelArgs when the engine needs them."""
    spec = engine_spec(cfg.engine)
    config_json = model_config_file(cfg.model.path) if spec.needs_model_args else None
    model_args = read_model_args(config_json) if config_json else None
    validate_run(cfg, model_args)
    if check_data:
        for stage in cfg.stages:
            d = stage.data  # a manifest's own pipe: command is refused here, before any weight loads
            open_dataset(d.path).check_urls(d.shard_url_template, d.trust_manifest_commands)
    return model_args


def train(cfg: RunConfig, resume: Literal["auto", "never"] | str = "auto") -> list[StageOutcome]:
    return Trainer(cfg, resume).run()


def _deadline_from_env() -> float | None:
    value = os.environ.get(DEADLINE_ENV, "").strip()
    try:
        return float(value) or None if value else None
    except ValueError:
        raise ConfigError(f"{DEADLINE_ENV}={value!r}: expected the job's end time in unix seconds") from None


def clear_run_markers(output_dir: Path) -> None:
    """A stale STOPPED must not make a crash look like a stop, a stale STOP_REQUESTED must not stop
    a resumed run at once."""
    for name in (STOPPED, STOP_REQUEST):
        (output_dir / name).unlink(missing_ok=True)


def run_recipe(cfg: RunConfig, resume: Literal["auto", "never"] | str = "auto", stop_after_steps: int | None = None,
               clear_markers: bool = True) -> tuple[list[StageOutcome], bool, Trainer]:
    """This rank's part of a whole run, as every launcher runs it: (outcomes, finished, trainer).

    Rank 0 keeps the run-level files in step with how the run ends: it clears stale markers at the
    start (unless the launcher did, once for several attempts) and writes STOPPED when the run
    stopped early with a checkpoint, so a batch script or a driver knows to requeue, not give up."""
    out = Path(cfg.output_dir)
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0 and clear_markers:
        clear_run_markers(out)
    trainer = Trainer(cfg, resume=resume)
    trainer.stop_after_steps = stop_after_steps
    outcomes = trainer.run()
    finished = len(outcomes) == len(cfg.stages) and all(o.final_dir for o in outcomes)
    if rank0 and not finished and outcomes:
        (out / STOPPED).write_text(json.dumps({"stage": outcomes[-1].name, "step": outcomes[-1].steps_done}) + "\n")
    return outcomes, finished, trainer
