"""The training loop: stages in order, each a LoRA (or full) fine-tune with its own objective.

Stage chaining follows LLM2Vec: a finished stage's adapter is merged and the merged encoder saved
to `<run>/<NN>-<stage>/final/` (a sentence-transformers folder); the next stage adds a new adapter
on top. Inside a stage: AdamW, warmup + decay, gradient accumulation, clipping, optional bf16
autocast, `step-N/` checkpoints and exact resume (weights bit-identical on CPU).

This module knows no launcher: no Ray, no SLURM. A SIGTERM/SIGUSR2 only sets a flag; the loop
saves at the next step boundary and returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from data_pipelines.loader import StreamingLoader, open_dataset
from toolkit.checkpoint.manager import latest_complete, load_checkpoint, save_checkpoint
from toolkit.config import RunConfig, ScheduleConfig, StageConfig, to_dict
from toolkit.models.encoder import SPEC_FILE, Encoder
from toolkit.models.loading import build_encoder, set_attention_dropout
from toolkit.models.lora import add_lora, merge_lora
from toolkit.objectives.steps import build_step
from toolkit.training_log import TrainingLog

log = logging.getLogger(__name__)


@dataclass
class StageOutcome:
    name: str
    final_dir: Path | None  # None when the stage stopped early (checkpoint saved)
    steps_done: int
    last_loss: float | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    def __init__(self, cfg: RunConfig, resume: Literal["auto", "never"] | str = "auto"):
        self.cfg = cfg
        self.resume = resume
        self.out = Path(cfg.output_dir)
        self.stop = StopFlag()
        self.stop_after_steps: int | None = None  # stop (with a checkpoint) after this many steps in this process

    # ------------------------------------------------------------------ run
    def run(self) -> list[StageOutcome]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        seed_everything(self.cfg.seed)
        for stage in self.cfg.stages:  # bad data paths fail before minutes of model loading
            open_dataset(stage.data.path)
        needs_new_mask = any(
            s.objective.kind == "mntp" and s.objective.mntp.mask_token == "new" for s in self.cfg.stages
        )
        encoder, lm_head = build_encoder(
            self.cfg.model, self.cfg.pooling, seed=self.cfg.seed, add_mask_token=needs_new_mask
        )
        if self.cfg.model.gradient_checkpointing:
            encoder.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        outcomes: list[StageOutcome] = []
        previous_final: Path | None = None
        self.stop.install()
        try:
            for index, stage in enumerate(self.cfg.stages):
                stage_dir = self.out / f"{index:02d}-{stage.name}"
                final = stage_dir / "final"
                if (final / SPEC_FILE).is_file() and self.resume != "never":
                    log.info("stage %s already complete: %s", stage.name, final)
                    outcomes.append(StageOutcome(stage.name, final, stage.steps, None))
                    previous_final = final
                    continue
                if previous_final is not None:
                    load_encoder_weights(encoder, previous_final)
                outcome = self._run_stage(index, stage, stage_dir, encoder, lm_head)
                outcomes.append(outcome)
                if outcome.final_dir is None:
                    break
                previous_final = outcome.final_dir
        finally:
            self.stop.uninstall()
        return outcomes

    # ------------------------------------------------------------------ one stage
    def _run_stage(self, index: int, stage: StageConfig, stage_dir: Path, encoder: Encoder, lm_head) -> StageOutcome:
        stage_seed = self.cfg.seed + 1000 * (index + 1)
        seed_everything(stage_seed)
        manifest = open_dataset(stage.data.path)
        loader = StreamingLoader(manifest, stage.data, seed=stage_seed, tokenizer=encoder.tokenizer)

        base = encoder.backbone
        # Every stage sets its own attention dropout, so one stage's (SimCSE's 0.3) never leaks into the next.
        dropout = next(p for p in (stage.attention_dropout, self.cfg.model.attention_dropout,
                                   getattr(base.config, "attention_dropout", 0.0), 0.0) if p is not None)
        set_attention_dropout(base, float(dropout))
        if stage.lora.enabled:
            encoder.backbone = add_lora(base, stage.lora)
        else:
            base.requires_grad_(True)
        encoder.pooling.requires_grad_(True)
        params = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
        opt_cfg = stage.optimizer
        optimizer = torch.optim.AdamW(
            params.values(), lr=opt_cfg.lr, betas=opt_cfg.betas, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage.schedule, stage.steps))
        generator = torch.Generator().manual_seed(stage_seed)
        step_fn = build_step(stage, encoder, lm_head, generator, data_kind=manifest.kind)

        step = 0
        checkpoint = self._resume_point(stage_dir)
        if checkpoint is not None:
            step = self._restore(checkpoint, stage, params, optimizer, scheduler, generator, loader)
            log.info("stage %s: resumed from %s (step %d)", stage.name, checkpoint, step)

        def save(at_step: int) -> Path:
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                    "generator": generator.get_state(),
                },
            }
            meta = {
                "stage": stage.name,
                "step": at_step,
                "loader": loader.state_dict(),
                "fingerprint": stage_fingerprint(stage),
                "trainable": sorted(params),
            }
            return save_checkpoint(stage_dir, at_step, params, state, meta, self.cfg.checkpoint.keep_last)

        tlog = TrainingLog(self.out, stage.name, stage.steps, self.cfg.logging, start_step=step)
        encoder.train()
        batches = iter(loader)
        last_loss, steps_this_run = None, 0
        try:
            while step < stage.steps:
                t0 = time.perf_counter()
                loss_sum, tokens = 0.0, 0
                for _ in range(stage.grad_accum):
                    stats = step_fn.step(next(batches), 1.0 / stage.grad_accum)
                    loss_sum += stats.loss / stage.grad_accum
                    tokens += stats.tokens
                grad_norm = self._clip(params, stage.optimizer.clip_grad)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                steps_this_run += 1
                last_loss = loss_sum
                tlog.step(step, loss_sum, scheduler.get_last_lr()[0], tokens, time.perf_counter() - t0, grad_norm)
                if not math.isfinite(loss_sum):
                    save(step)
                    raise FloatingPointError(f"stage {stage.name}: loss is {loss_sum} at step {step} (checkpoint saved)")
                every = self.cfg.checkpoint.every_steps
                preempted = self.stop.requested or (
                    self.stop_after_steps is not None and steps_this_run >= self.stop_after_steps
                )
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

        encoder.backbone = merge_lora(encoder.backbone)
        encoder.backbone.requires_grad_(False)
        final = encoder.save_pretrained(stage_dir / "final")
        log.info("stage %s: done, merged encoder saved to %s", stage.name, final)
        return StageOutcome(stage.name, final, step, last_loss)

    # ------------------------------------------------------------------ helpers
    def _resume_point(self, stage_dir: Path) -> Path | None:
        if self.resume == "never":
            return None
        if self.resume == "auto":
            return latest_complete(stage_dir)
        path = Path(self.resume)
        return path if path.parent == stage_dir else None

    def _restore(self, path: Path, stage: StageConfig, params, optimizer, scheduler, generator, loader) -> int:
        tensors, state, meta = load_checkpoint(path)
        if meta.get("fingerprint") != stage_fingerprint(stage):
            raise ValueError(
                f"{path}: checkpoint was written with a different configuration of stage {stage.name!r} "
                "(objective, data, lora, optimizer, schedule, batch or precision changed); "
                "resume with the same config, or start a new output_dir"
            )
        missing = sorted(set(params) - set(tensors))
        unexpected = sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise ValueError(f"{path}/trainable.safetensors: parameters differ (missing {missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        generator.set_state(rng["generator"])
        loader.load_state_dict(meta["loader"], where=str(path))
        return int(meta["step"])

    @staticmethod
    def _clip(params: dict, max_norm: float) -> float:
        grads = [p for p in params.values() if p.grad is not None]
        if not grads:
            return 0.0
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))


def load_encoder_weights(encoder: Encoder, folder: Path) -> None:
    """Load a finished stage's merged backbone (and pooling head) into the live encoder."""
    encoder.backbone.load_state_dict(load_file(str(folder / "model.safetensors")))
    load_pooling_weights(encoder.pooling, folder)


def load_pooling_weights(pooling, folder: Path) -> None:
    """A trained pooling head from an encoder folder (no-op for parameter-free heads)."""
    pooling_file = folder / "1_Pooling" / "model.safetensors"
    if pooling.has_parameters and pooling_file.is_file():
        state = {k.removeprefix("pooling."): v for k, v in load_file(str(pooling_file)).items()}
        pooling.load_state_dict(state)


def train(cfg: RunConfig, resume: Literal["auto", "never"] | str = "auto") -> list[StageOutcome]:
    return Trainer(cfg, resume).run()
