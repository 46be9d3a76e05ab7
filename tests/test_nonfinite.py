"""Non-finite steps (issue 16, item 1): a NaN / inf loss or grad norm never reaches the weights.

Every engine checks the loss and the global grad norm before the update and skips it (weights, optimizer
state and LR schedule untouched) on every rank; the trainer logs each skip, writes it to metrics.jsonl,
never commits a checkpoint after a skipped step nor one holding non-finite weights, and stops after
`train.max_skipped_steps` consecutive skips with a one-line error naming the newest good checkpoint,
which `--resume auto` loads. Non-finite values are real: NaN gradients written into the engine's
gradients, or an absurd learning rate (1e30) whose first update makes the next forward overflow.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import EMBEDFORGE, run_config, torchrun, two_stage_recipe
from toolkit.engines.base import StepResult
from toolkit.engines.hf import HFEngine
from toolkit.errors import EmbedforgeError, NonFiniteError
from toolkit.train import StepGuard, Trainer


def one_stage(tmp_path, model, out, **overrides):
    """The tiny recipe's MNTP stage alone (LoRA, checkpoints every 2 steps, keep_last 2)."""
    cfg = run_config(tmp_path, model, out, **overrides)
    return replace(cfg, stages=[cfg.stages[0]])


def metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture
def recorder(monkeypatch):
    """Poisons the gradients (NaN) and the loss at chosen step numbers of this process, and records each
    step's trainable weights, optimizer step counts and LR-schedule position before and after it."""
    steps: list[dict] = []
    poison: set[int] = set()
    forward_backward, train_step = HFEngine._forward_backward, HFEngine.train_step

    def fb(self, micro_batches):
        loss, tokens = forward_backward(self, micro_batches)
        if len(steps) - 1 in poison:  # 0-based index of the step now running
            for p in self.params.values():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            loss = float("nan")
        return loss, tokens

    def snapshot(self):
        return ({k: v.detach().clone() for k, v in self.params.items()},
                [int(s["step"]) for s in self.optimizer.state.values() if "step" in s], self.scheduler.last_epoch)

    def ts(self, micro_batches):
        before = snapshot(self)
        steps.append({})
        result = train_step(self, micro_batches)
        steps[-1].update(before=before, after=snapshot(self), result=result)
        return result

    monkeypatch.setattr(HFEngine, "_forward_backward", fb)
    monkeypatch.setattr(HFEngine, "train_step", ts)
    return steps, poison


def assert_unchanged(record):
    (w0, opt0, sched0), (w1, opt1, sched1) = record["before"], record["after"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # bit-identical
    assert (opt0, sched0) == (opt1, sched1)


def assert_finite_checkpoints(stage_dir: Path) -> list[Path]:
    done = sorted(p for p in stage_dir.glob("step-*") if (p / "COMPLETE").is_file())
    for step_dir in done:
        assert all(torch.isfinite(t).all() for t in load_file(str(step_dir / "trainable.safetensors")).values())
    return done


# ------------------------------------------------------------------------------------------ hf
def test_a_transient_nan_step_is_skipped_and_training_continues(tiny_llama_dir, tmp_path, recorder):
    steps, poison = recorder
    poison.add(2)  # the third step (0-based index 2)
    outcomes = Trainer(one_stage(tmp_path, tiny_llama_dir, "run", mntp__steps=6)).run()
    assert outcomes[0].final_dir is not None  # finished
    assert [s["result"].skipped for s in steps] == [False, False, True, False, False, False]
    assert_unchanged(steps[2])
    assert not any(torch.equal(steps[3]["before"][0][k], steps[3]["after"][0][k]) for k in steps[3]["before"][0]
                   if "lora_B" in k)  # the next step trains again
    rows = metrics(tmp_path / "run")
    assert rows[3].get("skipped") is True and all(not rows[s].get("skipped") for s in (1, 2, 4, 5, 6))
    assert assert_finite_checkpoints(tmp_path / "run" / "00-mntp")


def test_consecutive_nan_steps_stop_the_run_and_keep_the_newest_good_checkpoint(tiny_llama_dir, tmp_path, recorder,
                                                                                caplog):
    steps, poison = recorder
    poison.update(range(3, 100))  # every step from the 4th on
    cfg = one_stage(tmp_path, tiny_llama_dir, "run", mntp__steps=10)
    cfg = replace(cfg, train=replace(cfg.train, max_skipped_steps=3))
    stage_dir = tmp_path / "run" / "00-mntp"
    with pytest.raises(NonFiniteError) as err:
        Trainer(cfg).run()
    message = str(err.value)
    assert isinstance(err.value, EmbedforgeError) and "\n" not in message
    assert message.startswith("stage mntp: 3 consecutive non-finite steps (loss nan, grad norm nan) at step 6; "
                              f"the newest good checkpoint is {stage_dir / 'step-2'}; resume it with a lower "
                              "learning rate"), message
    assert [s["result"].skipped for s in steps] == [False] * 3 + [True] * 3
    for record in steps[3:]:
        assert_unchanged(record)
    # steps 4 and 6 were skipped: no checkpoint after them, step-2 is intact
    assert [p.name for p in assert_finite_checkpoints(stage_dir)] == ["step-2"]
    assert not list(stage_dir.glob("step-4*")) and not list(stage_dir.glob("step-6*"))
    rows = metrics(tmp_path / "run")
    assert [s for s, r in sorted(rows.items()) if r.get("skipped")] == [4, 5, 6]
    assert sum("skipped: non-finite loss" in r.message for r in caplog.records) == 3

    poison.clear()  # the cause is gone: --resume auto continues from step-2 and finishes
    with caplog.at_level(logging.INFO, logger="toolkit.train"):
        outcomes = Trainer(cfg, resume="auto").run()
    assert outcomes[0].final_dir is not None and outcomes[0].steps_done == 10
    assert any(f"resumed from {stage_dir / 'step-2'} (step 2)" in r.message for r in caplog.records)


def test_an_absurd_learning_rate_stops_with_the_error_and_resume_loads_the_good_step(tiny_llama_dir, tmp_path):
    """lr 1e30 on full fine-tuning: step 1's update is finite (weights ~1e30), every later forward overflows."""
    cfg = one_stage(tmp_path, tiny_llama_dir, "run", mntp__steps=10, mntp__optimizer={"lr": 1e30},
                    mntp__lora={"enabled": False})
    cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, every_steps=1))
    stage_dir = tmp_path / "run" / "00-mntp"
    for _ in range(2):  # the second run resumes step-1 (auto) and fails the same way: nothing else was saved
        with pytest.raises(NonFiniteError, match=r"stage mntp: 5 consecutive non-finite steps \(loss nan, grad norm "
                           r".*\) at step 6; the newest good checkpoint is .*step-1; resume it"):
            Trainer(cfg, resume="auto").run()
        assert [p.name for p in assert_finite_checkpoints(stage_dir)] == ["step-1"]
    rows = metrics(tmp_path / "run")
    assert [s for s, r in sorted(rows.items()) if r.get("skipped")] == [2, 3, 4, 5, 6]


def test_non_finite_weights_are_never_saved(tiny_llama_dir, tmp_path, monkeypatch):
    train_step = HFEngine.train_step

    def ts(self, micro_batches):
        result = train_step(self, micro_batches)
        if self.scheduler.last_epoch == 2:  # as if an update had gone wrong despite the checks
            next(iter(self.params.values())).data[0] = float("inf")
        return result

    monkeypatch.setattr(HFEngine, "train_step", ts)
    with pytest.raises(NonFiniteError, match="stage mntp: trainable weights are non-finite at step 2; refusing to save"):
        Trainer(one_stage(tmp_path, tiny_llama_dir, "run", mntp__steps=4)).run()
    assert not list((tmp_path / "run" / "00-mntp").glob("step-2*"))


def test_collapse_warning(caplog):
    def result(loss, norm):
        return StepResult(loss=loss, tokens=1, grad_norm=norm, lr=1.0)

    guard = StepGuard("mntp", max_skipped=5, collapse_window=4)
    with caplog.at_level(logging.WARNING):
        for step in range(1, 4):
            guard.observe(step, result(1.0 + step, 0.0))  # zero grad norm, steps 1-3: under the window
        assert not caplog.records
        for step in range(4, 12):
            guard.observe(step, result(1.0 + step, 0.0))
    assert [r.message for r in caplog.records] == [
        "stage mntp: the run looks collapsed: grad norm 0 or a constant loss (5) for steps 1-4; "
        "check the learning rate and the data"]  # once per stage
    caplog.clear()
    guard = StepGuard("sup", max_skipped=5, collapse_window=3)
    with caplog.at_level(logging.WARNING):
        for step, loss in enumerate([2.0, 1.5, 0.7, 0.7, 0.7 * (1 + 1e-9), 0.7], start=1):  # constant from step 3
            guard.observe(step, result(loss, 0.5))
    assert [r.message for r in caplog.records if "collapsed" in r.message] == [
        "stage sup: the run looks collapsed: grad norm 0 or a constant loss (0.7) for steps 4-6; "
        "check the learning rate and the data"]


def test_a_collapsed_run_warns_once(tiny_llama_dir, tmp_path, caplog):
    """lr 1e30 on LoRA saturates the model: grad norm exactly 0 from step 2 on; the run finishes (exit 0)
    with one warning naming the stage and the steps."""
    cfg = one_stage(tmp_path, tiny_llama_dir, "run", mntp__steps=6, mntp__optimizer={"lr": 1e30})
    cfg = replace(cfg, train=replace(cfg.train, collapse_window=3))
    with caplog.at_level(logging.WARNING, logger="toolkit.train"):
        outcomes = Trainer(cfg).run()
    assert outcomes[0].final_dir is not None
    assert [r.message for r in caplog.records if "collapsed" in r.message] == [
        f"stage mntp: the run looks collapsed: grad norm 0 or a constant loss ({metrics(tmp_path / 'run')[4]['loss']:g}) "
        "for steps 2-4; check the learning rate and the data"]


def test_max_skipped_steps_is_validated(tiny_llama_dir, tmp_path):
    from toolkit.config import ConfigError, config_from_dict

    base = {"output_dir": "x", "model": {"path": "m"},
            "stages": [{"name": "s", "steps": 1, "objective": {"kind": "simcse"}, "data": {"path": "d"}}]}
    assert config_from_dict(base).train.max_skipped_steps == 5
    with pytest.raises(ConfigError, match="max_skipped_steps must be >= 1"):
        config_from_dict({**base, "train": {"max_skipped_steps": 0}})


# ------------------------------------------------------------------------------------------ megatron / deepspeed
@pytest.mark.slow
def test_megatron_skips_non_finite_steps(tmp_path):
    """One process (gloo, tp=1): the absurd-lr run stops with the one-line error; step-1 is kept."""
    cfg = two_stage_recipe(tmp_path)
    run = tmp_path / "run"
    args = [EMBEDFORGE, "train", str(cfg), f"output_dir={run}", "stages.mntp.optimizer.lr=1e30",
            "stages.mntp.steps=6", "checkpoint.every_steps=1", "train.max_skipped_steps=3"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-4000:]
    assert "stage mntp: 3 consecutive non-finite steps" in r.stderr and "at step 4" in r.stderr, r.stderr[-3000:]
    assert f"{run / '00-mntp' / 'step-1'}; resume it" in r.stderr
    stage_dir = run / "00-mntp"
    assert (stage_dir / "step-1" / "COMPLETE").is_file() and not list(stage_dir.glob("step-[2-9]*"))
    rows = metrics(run)
    assert [s for s, row in sorted(rows.items()) if row.get("skipped")] == [2, 3, 4]
    r2 = subprocess.run(args, capture_output=True, text=True, timeout=600)  # --resume auto loads step-1
    assert r2.returncode == 2 and "resumed from" in r2.stderr and "step-1 (step 1)" in r2.stderr, r2.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("zero", [2, 3, 0])
def test_deepspeed_zero2_skips_non_finite_steps(tmp_path, zero):
    """2 gloo ranks, ZeRO-2 (and 3, 0): DeepSpeed's step() takes its overflow path (no update, no LR step)
    on the non-finite norm; the run stops with the error, step-1 (ZeRO partitions) is kept and finite."""
    from tests.test_deepspeed_engine import recipe
    from toolkit.engines.deepspeed_zero import read_trainable

    cfg = recipe(tmp_path)
    run = tmp_path / "run"
    args = ["train", str(cfg), f"output_dir={run}", f"zero.stage={zero}", "stages.mntp.optimizer.lr=1e30",
            "stages.mntp.steps=4", "checkpoint.every_steps=1", "train.max_skipped_steps=2"]
    r = torchrun(*args)
    assert r.returncode != 0 and "stage mntp: 2 consecutive non-finite steps" in r.stderr, r.stderr[-4000:]
    stage_dir = run / "00-mntp"
    assert (stage_dir / "step-1" / "COMPLETE").is_file() and not list(stage_dir.glob("step-[2-9]*"))
    assert all(torch.isfinite(t).all() for t in read_trainable(stage_dir / "step-1").values())
    rows = metrics(run)
    assert [s for s, row in sorted(rows.items()) if row.get("skipped")] == [2, 3]
    assert rows[2]["lr"] == rows[3]["lr"]  # the LR schedule did not move on the skipped step
