"""bench/stage_study.py: its tables name the right stage for every sweep label, its standard errors are
over seeds, and every training-time setting is a valid recipe that changes exactly one stage."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from toolkit.config import load_config
from toolkit.run_layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]


def load_study():
    if "stage_study" not in sys.modules:
        spec = importlib.util.spec_from_file_location("stage_study", ROOT / "bench" / "stage_study.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["stage_study"] = module
    return sys.modules["stage_study"]


def stage_study_settings():
    return load_study().TRAIN_SETTINGS


@pytest.fixture(scope="module")
def study():
    return load_study()


@pytest.mark.parametrize("label, stage", [
    ("untrained-causal-seed-0", "causal"),
    ("untrained-bidirectional-seed-2", "bidirectional"),
    ("seed-1/simcse/final", "+ simcse"),
    ("seed-0/supervised/final (no instructions)", "+ supervised, no instructions"),
    ("simcse-seed-0-pool-weighted_mean", "+ simcse, weighted_mean pooling"),
    ("causal-pool-weighted_mean", "causal, weighted_mean pooling"),
    ("mntp-mask-probability-0.4/mntp/final", "+ mntp, objective.mntp.mask_probability=0.4"),
    ("minilm", "all-MiniLM-L6-v2"),
])
def test_every_label_names_its_stage(study, label, stage):
    assert study.stage_of(label) == stage


def test_standard_error_is_over_seeds_and_settings_are_compared_to_their_own_seed(study):
    rows = [{"model": f"seed-{s}/simcse/final", "task": "T", "score": v} for s, v in ((0, 50.0), (1, 54.0), (2, 52.0))]
    rows.append({"model": "simcse-batch-64/simcse/final", "task": "T", "score": 55.0})
    table = study.summarise(rows)
    assert "| + simcse | 52.0 +- 1.2 (n=3) |" in table  # std 2, /sqrt(3)
    assert "| + simcse, data.batch_size=64 | 55.0 (n=1) |" in table
    deltas = study.setting_deltas(rows, seed=1)  # against seed 1's own row; the yardstick is one run's spread
    assert "| + simcse, data.batch_size=64 | T | 55.0 | 54.0 | +1.0 | 2.0 (n=3) |" in deltas


def changed_fields(a, b, prefix=""):
    """Dotted names of the fields whose values differ between two config dataclasses."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return {name for f in dataclasses.fields(a)
                for name in changed_fields(getattr(a, f.name), getattr(b, f.name), prefix + f.name + ".")}
    return set() if a == b else {prefix.rstrip(".")}


@pytest.mark.parametrize("name", sorted(stage_study_settings()))
def test_a_training_setting_changes_one_value_of_one_stage_and_starts_from_the_seeds_own_stages(
        study, name, tmp_path, monkeypatch):
    out, seed = tmp_path / "study", 1  # not the recipe's own seed: the seed must reach the run and the links
    for i, stage in enumerate(("mntp", "simcse")):
        final = RunLayout(out / f"seed-{seed}").final_dir(i, stage)
        final.mkdir(parents=True)
        (final / "embedforge.json").write_text("{}")
    calls = []
    monkeypatch.setattr(study, "run_child", lambda cmd: calls.append(cmd) or 0)
    stage, overrides = study.TRAIN_SETTINGS[name]
    final = study.train_setting(name, seed, out)
    run = out / "train-settings" / f"seed-{seed}" / name
    assert final.parent.parent == run and final.parent.name.endswith("-" + stage)
    assert calls == [[study.EMBEDFORGE, "train", str(run / "recipe.yaml"), "--resume", "auto"]]
    cfg = load_config(run / "recipe.yaml")  # a valid recipe: every override names a real field
    base = load_config(study.RECIPE)
    assert cfg.seed == seed and Path(cfg.output_dir) == run.resolve()
    assert [s.name for s in cfg.stages] == [s.name for s in base.stages][: len(cfg.stages)]
    *earlier, retrained = cfg.stages
    assert retrained.name == stage and earlier == list(base.stages[: len(earlier)])
    assert changed_fields(base.stages[len(earlier)], retrained) == {o.split("=")[0] for o in overrides}
    # the model is the study's, save recomputation where a setting needs it to fit 24 GiB (same loss)
    assert changed_fields(base.model, cfg.model) == ({"gradient_checkpointing"} if name in study.RECOMPUTE else set())
    assert cfg.model.gradient_checkpointing is (name in study.RECOMPUTE) and study.RECOMPUTE <= set(study.TRAIN_SETTINGS)
    for i, stage_cfg in enumerate(earlier):  # the seed's own finals, linked: the run skips them
        linked = RunLayout(run).final_dir(i, stage_cfg.name) / "embedforge.json"
        assert linked.is_symlink() and not Path(os.readlink(linked)).is_absolute()
        assert linked.resolve() == (RunLayout(out / f"seed-{seed}").final_dir(i, stage_cfg.name) / "embedforge.json").resolve()
    # a rerun keeps good links and rebuilds dangling ones (a study moved, or a stop mid-way)
    assert study.train_setting(name, seed, out) == final
    if earlier:
        linked = RunLayout(run).final_dir(0, "mntp") / "embedforge.json"
        linked.unlink()
        linked.symlink_to("../../nowhere.json")
        study.train_setting(name, seed, out)
        assert linked.read_text() == "{}"


def test_a_setting_needs_the_seeds_own_earlier_stages(study, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "run_child", lambda cmd: pytest.fail("trained without the seed's MNTP stage"))
    with pytest.raises(SystemExit, match="seed-2/00-mntp/final: missing; train seed 2 first"):
        study.train_setting("simcse-lr-3e-4", 2, tmp_path)
