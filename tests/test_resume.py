"""Issue 16, resume: a relative or wrong `--resume PATH`, changed settings, a refused start and Ctrl-C never
cost a run its checkpoints or its config.yaml (docs/failure.md)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import EMBEDFORGE, run_config, run_embedforge, subprocess_env
from toolkit.config import ConfigError, load_config, to_dict
from toolkit.errors import CheckpointError
from toolkit.run_settings import settings_changes, stage_fingerprint
from toolkit.train import StopFlag, Trainer


def stopped_run(tmp_path: Path, model: Path, **kw):
    """The 3-stage tiny recipe stopped at MNTP step 3: step-2 (every 2) and step-3 (the stop) on disk."""
    cfg = run_config(tmp_path, model, **kw)
    trainer = Trainer(cfg)
    trainer.stop_after_steps = 3
    trainer.run()
    stage = tmp_path / "run" / "00-mntp"
    assert sorted(p.name for p in stage.glob("step-*")) == ["step-2", "step-3"]
    return cfg


def step_names(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "run" / "00-mntp").glob("step-*"))


def test_relative_resume_path_continues_that_step(tiny_llama_dir, tmp_path, monkeypatch):
    cfg = stopped_run(tmp_path, tiny_llama_dir)
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(cfg, resume="run/00-mntp/step-2")
    trainer.stop_after_steps = 1
    outcomes = trainer.run()
    assert outcomes[0].steps_done == 3  # resumed at 2, one step, stopped (not restarted at 0)
    assert json.loads((tmp_path / "run" / "00-mntp" / "step-3" / "meta.json").read_text())["step"] == 3


def test_resume_path_not_of_the_stage_being_started_is_refused(tiny_llama_dir, tmp_path):
    cfg = stopped_run(tmp_path, tiny_llama_dir)
    run = tmp_path / "run"
    config_before = (run / "config.yaml").read_bytes()
    shutil.copytree(run / "00-mntp" / "step-2", tmp_path / "other" / "00-mntp" / "step-2")
    shutil.copytree(run / "00-mntp" / "step-2", run / "01-simcse" / "step-2")
    (run / "00-mntp" / "step-4").mkdir()  # not complete: no marker
    cases = {tmp_path / "other" / "00-mntp" / "step-2": "expected a step-N/ folder of",
             run / "01-simcse" / "step-2": "stage mntp is not finished",
             run / "00-mntp" / "step-4": "not a complete checkpoint",
             run / "00-mntp" / "step-9": "not a complete checkpoint",
             run / "00-mntp": "expected a step-N/ folder of"}
    for path, reason in cases.items():
        with pytest.raises(CheckpointError, match=reason) as info:
            Trainer(cfg, resume=str(path)).run()
        assert str(path) in str(info.value)
    assert step_names(tmp_path) == ["step-2", "step-3", "step-4"]  # nothing pruned
    assert (run / "config.yaml").read_bytes() == config_before


def test_changed_model_or_pooling_is_refused_and_config_kept(tiny_llama_dir, tmp_path):
    stopped_run(tmp_path, tiny_llama_dir)
    config_file = tmp_path / "run" / "config.yaml"
    config_before = config_file.read_bytes()
    changed = run_config(tmp_path, tiny_llama_dir, model_extra={"bidirectional": False})
    with pytest.raises(ConfigError, match="model.bidirectional: true -> false"):
        Trainer(changed).run()
    pooled = run_config(tmp_path, tiny_llama_dir)
    pooled.pooling.mode = "last"
    with pytest.raises(ConfigError, match='pooling.mode: "mean" -> "last"'):
        Trainer(pooled).run()
    assert config_file.read_bytes() == config_before  # a later export still rebuilds the same model
    config_file.unlink()  # the checkpoint's own record refuses too (settings in meta.json)
    with pytest.raises(ConfigError, match="model.bidirectional: true -> false"):
        Trainer(changed).run()
    assert step_names(tmp_path) == ["step-2", "step-3"]


def test_resume_with_changes_lowers_the_learning_rate(tiny_llama_dir, tmp_path):
    stopped_run(tmp_path, tiny_llama_dir)
    lower = run_config(tmp_path, tiny_llama_dir, mntp__optimizer={"lr": 5e-4})
    with pytest.raises(ConfigError, match="stages.mntp.optimizer.lr: 0.001 -> 0.0005"):
        Trainer(lower, resume=str(tmp_path / "run" / "00-mntp" / "step-2"),
                allow_changes=["model.max_length"]).run()  # another key listed: still refused
    trainer = Trainer(lower, resume=str(tmp_path / "run" / "00-mntp" / "step-2"),
                      allow_changes=["stages.mntp.optimizer.lr"])
    trainer.stop_after_steps = 1
    assert trainer.run()[0].steps_done == 3
    meta = json.loads((tmp_path / "run" / "00-mntp" / "step-3" / "meta.json").read_text())
    assert meta["settings"]["stages.mntp.optimizer.lr"] == 5e-4
    assert meta["changes"] == [{"key": "stages.mntp.optimizer.lr", "from": 1e-3, "to": 5e-4,
                                "resumed_from": str(tmp_path / "run" / "00-mntp" / "step-2")}]
    config_text = (tmp_path / "run" / "config.yaml").read_text()
    assert "# resumed with changes" in config_text and "stages.mntp.optimizer.lr: 0.001 -> 0.0005" in config_text
    assert load_config(tmp_path / "run" / "config.yaml").stages[0].optimizer.lr == 5e-4
    again = Trainer(lower)  # the change is now the run's settings: a plain resume continues
    again.stop_after_steps = 1
    assert again.run()[0].final_dir is not None


def test_checkpoint_with_only_the_old_stage_hash(tiny_llama_dir, tmp_path):
    cfg = stopped_run(tmp_path, tiny_llama_dir)
    meta_file = tmp_path / "run" / "00-mntp" / "step-3" / "meta.json"
    meta = json.loads(meta_file.read_text())
    old = {k: v for k, v in meta.items() if k not in ("settings", "changes")}
    meta_file.write_text(json.dumps({**old, "fingerprint": "0123456789abcdef"}))
    with pytest.raises(ConfigError, match="only a hash of stage 'mntp'"):
        Trainer(cfg).run()
    meta_file.write_text(json.dumps({**old, "fingerprint": stage_fingerprint(cfg.stages[0])}))
    trainer = Trainer(cfg)
    trainer.stop_after_steps = 1
    outcomes = trainer.run()
    assert outcomes[0].steps_done == 4 and outcomes[0].final_dir is not None


def test_second_ctrl_c_aborts_at_once():
    flag = StopFlag().install()
    try:
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pytest.fail("a first Ctrl-C must only request a checkpoint and a stop")
        assert flag.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        flag.uninstall()


def test_ctrl_c_saves_a_checkpoint_and_auto_resume_continues(tiny_llama_dir, tmp_path):
    cfg = to_dict(run_config(tmp_path, tiny_llama_dir, mntp__steps=10_000))
    cfg["stages"] = cfg["stages"][:1]
    cfg["checkpoint"]["every_steps"] = 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    metrics = tmp_path / "run" / "metrics.jsonl"
    child = subprocess.Popen([EMBEDFORGE, "train", str(recipe)], env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert child.poll() is None and time.time() < deadline, child.stdout.read() if child.stdout else ""
            time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        output, _ = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 3, output
    steps = sorted((tmp_path / "run" / "00-mntp").glob("step-*"))
    assert len(steps) == 1 and (steps[0] / "COMPLETE").is_file(), output
    saved = json.loads((steps[0] / "meta.json").read_text())["step"]
    refused = run_embedforge("train", str(recipe), "pooling.mode=last", "--resume-with-changes", "model.max_length")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert 'pooling.mode: "mean" -> "last"' in refused.stderr.strip().splitlines()[-1], refused.stderr
    trainer = Trainer(load_config(recipe), resume="auto")
    trainer.stop_after_steps = 1
    assert trainer.run()[0].steps_done == saved + 1


def test_checkpoint_from_before_a_setting_existed_resumes_while_it_is_default(tiny_llama_dir, tmp_path):
    """A setting added after a checkpoint was written (here the teacher objective's and data.pack) is
    missing from its meta.json: no change while it holds its default, a refused change otherwise."""
    cfg = stopped_run(tmp_path, tiny_llama_dir)
    meta_file = tmp_path / "run" / "00-mntp" / "step-3" / "meta.json"
    meta = json.loads(meta_file.read_text())
    added = [k for k in meta["settings"] if ".objective.teacher." in k or k.endswith(".data.pack")]
    assert added
    meta["settings"] = {k: v for k, v in meta["settings"].items() if k not in added}
    meta_file.write_text(json.dumps(meta))
    saved = meta["settings"]
    assert settings_changes(saved, {**saved, "stages.mntp.data.pack": False}) == []
    assert settings_changes(saved, {**saved, "stages.mntp.data.pack": True}) == [
        {"key": "stages.mntp.data.pack", "from": None, "to": True}]
    trainer = Trainer(cfg)
    trainer.stop_after_steps = 1
    assert trainer.run()[0].steps_done == 4


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_in_a_terminal_stops_a_two_rank_run_with_a_checkpoint(tiny_llama_dir, tmp_path):
    """`train --nproc 2` and a terminal's Ctrl-C, which reaches the whole foreground process group: the
    ranks get one stop request (through torchrun), save and stop, exit 3. (When torchrun shared the
    group, each rank got the terminal's SIGINT and torchrun's forwarded one: two interrupts, the abort.)"""
    import os

    cfg = to_dict(run_config(tmp_path, tiny_llama_dir, mntp__steps=10_000))
    cfg["stages"] = cfg["stages"][:1]
    cfg["stages"][0]["data"]["mode"] = "resampled"  # one shard, two data-parallel readers
    cfg["checkpoint"]["every_steps"] = 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    metrics = tmp_path / "run" / "metrics.jsonl"
    child = subprocess.Popen([EMBEDFORGE, "train", str(recipe), "--nproc", "2"], env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own group: the "terminal's" foreground group
    try:
        deadline = time.time() + 600
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert child.poll() is None and time.time() < deadline, child.stdout.read() if child.stdout else ""
            time.sleep(0.2)
        os.killpg(child.pid, signal.SIGINT)
        output, _ = child.communicate(timeout=600)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 3, output
    steps = sorted((tmp_path / "run" / "00-mntp").glob("step-*"))
    assert len(steps) == 1 and (steps[0] / "COMPLETE").is_file(), output
