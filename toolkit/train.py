"""The training loop: stages in order, each a LoRA (or full) fine-tune with its own objective.

Stage chaining follows LLM2Vec: a finished stage's adapter is merged and the merged encoder saved
to `<run>/<NN>-<stage>/final/` (a sentence-transformers folder); the next stage adds a new adapter
on top. The loop is the same for every engine (`engine: hf | megatron`, toolkit/engines): it reads
this DP rank's shards, hands the engine one optimizer step's batches, logs, and writes `step-N/`
checkpoints (engine state + per-DP-replica data order and RNG) with exact resume (weights
bit-identical on CPU with the same layout; resharded by the megatron engine at another layout).

This module knows no launcher: no Ray, no SLURM. A SIGTERM/SIGUSR2 (or a first Ctrl-C) only sets a
flag; the loop saves at the next step boundary and returns. So does a near wall-time limit, given as a deadline in
EMBEDFORGE_DEADLINE by whichever launcher knows it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from transformers import AutoTokenizer

from data_pipelines.loader import StreamingLoader, open_dataset
from toolkit.assets import model_config_file
from toolkit.atomic import atomic_write_text, ensure_writable_dir, remove_stale_temps
from toolkit.checkpoint.integrity import NUMPY_ARRAY_GLOBALS, load_torch
from toolkit.checkpoint.manager import (
    begin_step_dir,
    complete_steps,
    disk_full_guard,
    latest_complete,
    newest_verified,
    read_meta,
    verify_checkpoint,
)
from toolkit.checkpoint.pending import SaveTracker
from toolkit.config import ConfigError, RunConfig, StageConfig, load_config, to_dict
from toolkit.distributed.parallel_dims import ParallelDims, init_distributed
from toolkit.engines.spec import DEFAULT_ENGINE, build_engine, engine_spec, validate_run
from toolkit.errors import CheckpointError, NonFiniteError
from toolkit.fault_injection import hold_until_stopped, injected_failure
from toolkit.models.arch import ModelArgs, read_model_args
from toolkit.models.folder import SPEC_FILE
from toolkit.objectives.mntp import resolve_mask_token
from toolkit.run_layout import COMPLETE, FINAL_DIR, STOP_REQUEST, STOPPED, RunLayout, parse_step_dir
from toolkit.run_settings import (
    check_changes,
    describe_change,
    fingerprint_settings,
    settings_hash,
    stage_fingerprint,
)
from toolkit.seeds import mask_seed, seed_everything, stage_seed
from toolkit.training_log import TrainingLog

log = logging.getLogger(__name__)
DEADLINE_ENV = "EMBEDFORGE_DEADLINE"


@dataclass
class StageOutcome:
    name: str
    final_dir: Path | None  # None when the stage stopped early (checkpoint saved)
    steps_done: int
    last_loss: float | None


class StopFlag:
    """Set by SIGTERM / SIGUSR2 (preemption notices) and a first Ctrl-C (SIGINT); checked at step
    boundaries, so an interrupted stage keeps its steps. A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.interrupts = 0
        self._previous: dict[int, object] = {}

    def install(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt  # the user insists: the steps since the last checkpoint are lost
            log.warning("Ctrl-C: saving a checkpoint at the next step boundary, then stopping "
                        "(Ctrl-C again aborts at once, without saving)")
        else:
            log.warning("signal %s received: saving a checkpoint at the next step boundary", signum)
        self.requested = True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


class Trainer:
    """Runs the stages of a recipe on one rank; every rank of a torchrun / SLURM / Ray job runs one."""

    def __init__(self, cfg: RunConfig, resume: Literal["auto", "never"] | str = "auto",
                 allow_changes: Sequence[str] = ()):
        """`allow_changes`: setting names (`stages.mntp.optimizer.lr`) that may differ from the ones the
        run's checkpoints were written with (--resume-with-changes); every other difference is refused."""
        self.cfg = cfg
        self.resume = resume
        self.allow_changes = tuple(allow_changes)
        self.run_changes: list[dict[str, Any]] = []  # accepted against config.yaml (noted in its header)
        self.resume_target: tuple[int, Path] | None = None  # (stage index, step-N/) of --resume PATH
        self.out = Path(cfg.output_dir)
        self.layout = RunLayout(self.out)
        self.stop = StopFlag()
        self.stop_after_steps: int | None = None  # stop (with a checkpoint) after this many steps in this process
        self.deadline = _deadline_from_env()  # the job's end (unix seconds), from the launcher
        self.slowest_step = 0.0
        self.saves = SaveTracker(rank=0, keep_last=cfg.checkpoint.keep_last)  # rank set once known

    # ------------------------------------------------------------------ run
    def run(self) -> list[StageOutcome]:
        model_args = preflight(self.cfg)  # a refused recipe or a bad data path fails before any weight loads
        self.resume_target = self._check_resume_path()
        previous_config = self._check_run_config()
        rank, world = init_distributed()
        self.dims = ParallelDims.from_config(self.cfg.parallel, world, rank)
        self.saves.rank = rank
        if self.dims.is_logging_rank:  # only now: a refused start leaves config.yaml as export needs it
            ensure_writable_dir(self.out)  # a read-only or impossible output_dir: one line naming it
            self._write_config(previous_config)
        seed_everything(self.cfg.seed)
        needs_new_mask = any(
            s.objective.kind == "mntp" and s.objective.mntp.mask_token == "new" for s in self.cfg.stages
        )
        self.engine = build_engine(self.cfg, self.dims, model_args)
        self.engine.build(add_mask_token=needs_new_mask)
        _check_context(self.cfg)  # again: an asset's config.json exists now, before any step is spent
        outcomes: list[StageOutcome] = []
        previous_final: Path | None = None
        self.stop.install()
        try:
            for index, stage in enumerate(self.cfg.stages):
                stage_dir = self.layout.stage_dir(index, stage.name)
                final = self.layout.final_dir(index, stage.name)
                if self.dims.is_logging_rank:
                    for stale in remove_stale_temps(final):  # left by a process that died writing final/
                        log.warning("removed %s (an interrupted write of %s)", stale, final)
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

        step, changes = 0, []
        checkpoint = self._resume_point(index, stage_dir)
        if checkpoint is not None:
            step, changes = self._restore(checkpoint, stage, generator, loader)
            log.info("stage %s: resumed from %s (step %d)", stage.name, checkpoint, step)
        settings = fingerprint_settings(self.cfg, [stage])

        def save(at_step: int) -> Path | None:
            """This step's checkpoint: committed now (returns step-N/), or by `self.saves` once its async
            write is done (returns None)."""
            self.saves.finish()  # never two saves in flight (and begin_step_dir clears stale partials)
            started = time.perf_counter()
            if not engine.trainable_finite():  # never commit non-finite weights (all ranks agree)
                raise NonFiniteError(f"stage {stage.name}: trainable weights are non-finite at step {at_step}; "
                                     f"refusing to save a checkpoint; the newest good checkpoint is "
                                     f"{_newest_good(stage_dir)}")
            tmp = begin_step_dir(stage_dir, at_step, dims.rank, self.cfg.checkpoint.keep_last)
            with disk_full_guard(tmp):
                handle = engine.begin_save(tmp)
                trainer_dir = tmp / "trainer"
                try:
                    if dims.tp_rank == 0 and dims.pp_rank == 0:  # one writer per DP replica: data order + RNG
                        trainer_dir.mkdir(exist_ok=True)
                        torch.save({"rng": _rng_state(generator), "loader": loader.state_dict()},
                                   trainer_dir / f"dp-{dims.dp_rank}.pt")
                    engine_rng = engine.rng_state()
                    if engine_rng:
                        trainer_dir.mkdir(exist_ok=True)
                        torch.save(engine_rng, trainer_dir / f"rank-{dims.rank}.pt")
                except BaseException:
                    handle.abandon()  # an async engine's writer must not outlive the failed save
                    raise
                meta = {"stage": stage.name, "step": at_step, "fingerprint": settings_hash(settings),
                        "settings": settings, "changes": changes,
                        "engine": engine.name, "layout": {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp}}
                return self.saves.started(handle, tmp, meta, started)

        logging_cfg = self.cfg.logging if dims.is_logging_rank else replace(
            self.cfg.logging, tensorboard=False, progress=False)
        tlog = TrainingLog(self.out, stage.name, stage.steps, logging_cfg, start_step=step,
                           write_metrics=dims.is_logging_rank)
        batches = iter(loader)
        last_loss, steps_this_run = None, 0
        guard = StepGuard(stage.name, self.cfg.train.max_skipped_steps, self.cfg.train.collapse_window)
        try:
            while step < stage.steps:
                t0 = time.perf_counter()
                # a skipped (non-finite) step still consumes its batches: the data order never depends on it
                result = engine.train_step([next(batches) for _ in range(stage.grad_accum)])
                step += 1
                injected_failure(dims.rank, stage.name, str(step))
                steps_this_run += 1
                seconds = time.perf_counter() - t0
                self.slowest_step = max(self.slowest_step, seconds)
                if not result.skipped:
                    last_loss = result.loss
                tlog.step(step, result.loss, result.lr, result.tokens, seconds, result.grad_norm, skipped=result.skipped)
                if guard.observe(step, result) >= guard.max_skipped:
                    raise NonFiniteError(
                        f"stage {stage.name}: {guard.consecutive} consecutive non-finite steps (loss {result.loss:g}, "
                        f"grad norm {result.grad_norm:g}) at step {step}; the newest good checkpoint is "
                        f"{_newest_good(stage_dir)}; resume it with a lower learning rate (see --resume-with-changes)")
                self.saves.poll()  # commits an async save once every rank's write is done
                every = self.cfg.checkpoint.every_steps
                preempted = self._agreed_stop(steps_this_run)
                # no periodic checkpoint on a skipped step: the newest step-N/ is one whose update was finite
                periodic = every and step % every == 0 and not result.skipped
                if step < stage.steps and (preempted or periodic):
                    path = save(step)
                    if preempted:
                        path = self.saves.finish() or path
                        log.warning("stage %s: stopped at step %d; resume from %s", stage.name, step, path)
                        return StageOutcome(stage.name, None, step, last_loss)
                hold_until_stopped(dims.rank, stage.name, step, lambda: self.stop.requested)
            self.saves.finish()
        except BaseException:
            self.saves.abandon()  # peers may be gone: no collective; the previous complete step stays
            raise
        finally:
            batches.close()  # stops loader workers
            tlog.close()
            if guard.total:
                log.warning("stage %s: skipped %d non-finite steps (%s)", stage.name, guard.total,
                            ", ".join(map(str, guard.skipped_steps[:20])))
            bad = loader.stats()
            if bad.num_bad:
                log.warning("stage %s: skipped %d bad records of %d read (%s)", stage.name, bad.num_bad,
                            bad.good + bad.num_bad, bad.bad)

        injected_failure(dims.rank, stage.name, "end")
        final = engine.end_stage(self.layout.final_dir(index, stage.name))
        log.info("stage %s: done, merged model saved to %s", stage.name, final)
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
        # room for the stop's own save (and the wait for one still in flight), each as slow as the slowest so far
        saves = self.saves.slowest_s * (2 if self.saves.in_flight else 1)
        if left > self.cfg.checkpoint.deadline_margin_s + 2 * self.slowest_step + saves:
            return False
        log.warning("%.0f s left before the job's time limit (%s): saving a checkpoint and stopping", left, DEADLINE_ENV)
        return True

    def _resume_point(self, index: int, stage_dir: Path) -> Path | None:
        if self.resume == "never":
            return None
        if self.resume == "auto":
            return newest_verified(stage_dir)
        target = self.resume_target  # checked by _check_resume_path: a later stage starts fresh
        return target[1] if target is not None and target[0] == index else None

    def _check_resume_path(self) -> tuple[int, Path] | None:
        """`--resume PATH` must be a complete step-N/ of the stage this start begins with (the first one
        without final/), resolved, so a relative path or a typo is refused, never silently ignored (an
        ignored path restarts at step 0, and the first save prunes the newer checkpoints)."""
        if self.resume in ("auto", "never"):
            return None
        path = Path(self.resume).expanduser().resolve()
        index = next((i for i, s in enumerate(self.cfg.stages)
                      if not (self.layout.final_dir(i, s.name) / SPEC_FILE).is_file()), None)
        if index is None:
            raise CheckpointError(f"--resume {self.resume}: every stage of {self.out} is finished; nothing to resume")
        expected = self.layout.stage_dir(index, self.cfg.stages[index].name).resolve()
        if parse_step_dir(path) is None or path.parent != expected:
            raise CheckpointError(f"--resume {self.resume} ({path}): {self._why_not_this_stage(path, index)}")
        if not (path / COMPLETE).is_file():
            raise CheckpointError(f"--resume {self.resume} ({path}): not a complete checkpoint (no {COMPLETE} "
                                  f"marker); complete ones: {[p.name for _, p in complete_steps(expected)]}")
        return index, path

    def _why_not_this_stage(self, path: Path, index: int) -> str:
        """What a refused --resume PATH was expected to be, in the run's own terms."""
        first = self.cfg.stages[index].name
        expected = f"expected a step-N/ folder of {self.layout.stage_dir(index, first).resolve()}"
        for i, stage in enumerate(self.cfg.stages):
            if parse_step_dir(path) is None or path.parent != self.layout.stage_dir(i, stage.name).resolve():
                continue
            if i > index:
                return f"stage {first} is not finished (no {self.layout.final_dir(index, first)}); {expected}"
            return f"stage {stage.name} is already finished; {expected}"
        return f"{expected} (the stage this run starts with)"

    def _check_run_config(self) -> RunConfig | None:
        """`export` rebuilds every step-N/ from config.yaml: while checkpoints exist, it is never replaced
        by different settings unless each change was listed (--resume-with-changes). Returns the old one."""
        file = self.layout.config_file
        self.run_changes = []
        if not file.is_file():
            return None
        previous = load_config(file, relative_to_recipe=False)  # the paths the run used, as recorded
        if self._has_checkpoints():
            self.run_changes = check_changes(f"{file} (the run's checkpoints)", fingerprint_settings(previous),
                                             fingerprint_settings(self.cfg), self.allow_changes)
        return previous

    def _has_checkpoints(self) -> bool:
        return any(complete_steps(d) or (d / FINAL_DIR / SPEC_FILE).is_file() for d in self.layout.stage_dirs())

    def _write_config(self, previous: RunConfig | None) -> None:
        """The recipe as run; deliberate changes are kept as a comment header (history included)."""
        self.out.mkdir(parents=True, exist_ok=True)
        file = self.layout.config_file
        header = [line for line in file.read_text().splitlines() if line.startswith("#")] if previous else []
        if self.run_changes:
            header.append(f"# resumed with changes (--resume-with-changes) at {time.strftime('%Y-%m-%d %H:%M:%S')}:")
            header += [f"#   {describe_change(c)}" for c in self.run_changes]
        body = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
        atomic_write_text(file, "".join(line + "\n" for line in header) + body)

    def _checkpoint_changes(self, path: Path, meta: dict[str, Any], stage: StageConfig) -> list[dict[str, Any]]:
        """The checkpoint's own record of its settings against this run's: refused unless unchanged or
        listed; returns every change since the stage began (kept in the next checkpoints' meta.json)."""
        earlier = list(meta.get("changes", []))
        saved = meta.get("settings")
        if saved is None:  # written before settings were recorded: only the stage's hash to compare
            if meta.get("fingerprint") == stage_fingerprint(stage):
                return earlier
            raise ConfigError(
                f"{path / 'meta.json'}: has only a hash of stage {stage.name!r}'s settings (an older checkpoint), "
                "and it does not match this config: resume with the config it was written with "
                f"({self.layout.config_file} when it was not changed since), or start a new output_dir")
        now = fingerprint_settings(self.cfg, [stage])
        accepted = check_changes(f"{path} (checkpoint of stage {stage.name!r})", saved, now, self.allow_changes)
        return earlier + [{**c, "resumed_from": str(path)} for c in accepted]

    def _restore(self, path: Path, stage: StageConfig, generator: torch.Generator,
                 loader: StreamingLoader) -> tuple[int, list[dict[str, Any]]]:
        verify_checkpoint(path)  # every file as written, before anything reads one
        meta = read_meta(path)
        changes = self._checkpoint_changes(path, meta, stage)
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
        return int(meta["step"]), changes


class StepGuard:
    """Counts a stage's skipped (non-finite) steps and watches for a collapsed run.

    `observe` logs each skipped step and returns the number of consecutive skips; a window of steps
    with a grad norm of exactly 0, or a loss equal to the previous one (1e-7 relative), logs one warning."""

    def __init__(self, stage: str, max_skipped: int, collapse_window: int):
        self.stage, self.max_skipped, self.window = stage, max_skipped, collapse_window
        self.consecutive = self.total = 0
        self.skipped_steps: list[int] = []
        self._flat_since: int | None = None
        self._previous_loss: float | None = None
        self._warned = False

    def observe(self, step: int, result) -> int:
        if result.skipped:
            self.consecutive += 1
            self.total += 1
            self.skipped_steps.append(step)
            log.warning("stage %s: step %d skipped: non-finite loss %g or grad norm %g (%d in a row, the limit "
                        "is train.max_skipped_steps=%d)", self.stage, step, result.loss, result.grad_norm,
                        self.consecutive, self.max_skipped)
            self._flat_since, self._previous_loss = None, None
            return self.consecutive
        self.consecutive = 0
        previous, self._previous_loss = self._previous_loss, result.loss
        flat = result.grad_norm == 0 or (previous is not None
                                         and abs(result.loss - previous) <= 1e-7 * max(abs(previous), 1e-12))
        if not flat:
            self._flat_since = None
            return 0
        self._flat_since = step if self._flat_since is None else self._flat_since
        if self.window and not self._warned and step - self._flat_since + 1 >= self.window:
            self._warned = True
            log.warning("stage %s: the run looks collapsed: grad norm 0 or a constant loss (%g) for steps %d-%d; "
                        "check the learning rate and the data", self.stage, result.loss, self._flat_since, step)
        return 0


def _newest_good(stage_dir: Path) -> str:
    newest = latest_complete(stage_dir)
    return str(newest) if newest is not None else f"none in {stage_dir} (the stage would restart from its start)"


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


def preflight(cfg: RunConfig, *, check_data: bool = True) -> ModelArgs | None:
    """Everything that can refuse a recipe before any weight is read: the engine's checks (against the
    model's config.json when it is on disk) and, unless a launcher submits for another machine, the
    data paths. Returns the model's ModelArgs when the engine needs them."""
    spec = engine_spec(cfg.engine)
    _check_context(cfg)
    _check_mask_tokens(cfg)
    config_json = model_config_file(cfg.model.path) if spec.needs_model_args else None
    model_args = read_model_args(config_json) if config_json else None
    validate_run(cfg, model_args)
    if check_data:
        for stage in cfg.stages:
            d = stage.data  # a manifest's own pipe: command is refused here, before any weight loads
            open_dataset(d.path).check_urls(d.shard_url_template, d.trust_manifest_commands)
    return model_args


def _check_context(cfg: RunConfig) -> None:
    """model.max_length, each stage's data.max_length and export.max_seq_length fit the model's context
    (max_position_embeddings), when its config.json is on disk (a folder, or an asset / .gguf already imported)."""
    config_json = model_config_file(cfg.model.path)
    if config_json is None:
        return
    try:
        context = json.loads(config_json.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return  # an unreadable config.json is the model loader's to report
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        return
    lengths = [("model.max_length", cfg.model.max_length)]
    lengths += [(f"stages.{s.name}.data.max_length", s.data.max_length) for s in cfg.stages]
    lengths.append(("export.max_seq_length", cfg.export.max_seq_length))  # 0 (auto) never exceeds it
    for name, value in lengths:
        if value > context:
            raise ConfigError(f"{name}: {value} is longer than the model's context ({context} tokens, "
                              f"max_position_embeddings in {config_json})")


def _check_mask_tokens(cfg: RunConfig) -> None:
    """Each MNTP stage's mask token exists in the model's tokenizer (read alone, when the model is on disk):
    a choice the tokenizer cannot honour fails here, not after the model has loaded."""
    stages = [s for s in cfg.stages if s.objective.kind == "mntp"]
    config_json = model_config_file(cfg.model.path) if stages else None
    if config_json is None:
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(config_json.parent)
    except (OSError, ValueError):  # no (readable) tokenizer beside the config: the model loader reports it
        return
    for stage in stages:
        try:
            resolve_mask_token(tokenizer, stage.objective.mntp.mask_token)
        except ConfigError as exc:
            raise ConfigError(f"stages.{stage.name}.objective.{exc} ({config_json.parent})") from None


def train(cfg: RunConfig, resume: Literal["auto", "never"] | str = "auto",
          allow_changes: Sequence[str] = ()) -> list[StageOutcome]:
    return Trainer(cfg, resume, allow_changes).run()


def _deadline_from_env() -> float | None:
    value = os.environ.get(DEADLINE_ENV, "").strip()
    try:
        return float(value) or None if value else None
    except ValueError:
        raise ConfigError(f"{DEADLINE_ENV}={value!r}: expected the job's end time in unix seconds") from None


def clear_run_markers(output_dir: Path) -> None:
    """A stale STOPPED must not make a crash look like a stop, a stale STOP_REQUESTED must not stop
    a resumed run at once."""
    if not output_dir.is_dir():
        return  # nothing to clear (and an impossible output_dir is reported by the trainer, naming it)
    for name in (STOPPED, STOP_REQUEST):
        (output_dir / name).unlink(missing_ok=True)


def run_recipe(cfg: RunConfig, resume: Literal["auto", "never"] | str = "auto", stop_after_steps: int | None = None,
               clear_markers: bool = True, allow_changes: Sequence[str] = ()) -> tuple[list[StageOutcome], bool, Trainer]:
    """This rank's part of a whole run, as every launcher runs it: (outcomes, finished, trainer).

    Rank 0 keeps the run-level files in step with how the run ends: it clears stale markers at the
    start (unless the launcher did, once for several attempts) and writes STOPPED when the run
    stopped early with a checkpoint, so a batch script or a driver knows to requeue, not give up."""
    out = Path(cfg.output_dir)
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0 and clear_markers:
        clear_run_markers(out)
    trainer = Trainer(cfg, resume=resume, allow_changes=allow_changes)
    trainer.stop_after_steps = stop_after_steps
    outcomes = trainer.run()
    finished = len(outcomes) == len(cfg.stages) and all(o.final_dir for o in outcomes)
    if rank0 and not finished and outcomes:
        (out / STOPPED).write_text(json.dumps({"stage": outcomes[-1].name, "step": outcomes[-1].steps_done}) + "\n")
    return outcomes, finished, trainer
