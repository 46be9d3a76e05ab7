"""Config loading: types, unknown keys, overrides and errors that name the file and the field."""

import pytest

from toolkit.config import ConfigError, RunConfig, load_config

BASE = """
output_dir: out
model: {path: some/model}
stages:
  - name: mntp
    objective: {kind: mntp}
    data: {path: data.jsonl}
    steps: 10
  - name: simcse
    objective: {kind: simcse, temperature: 0.05}
    data: {path: data.jsonl, batch_size: 8}
    steps: 5
"""


def write(tmp_path, text=BASE):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_loads_typed_defaults(tmp_path):
    cfg = load_config(write(tmp_path))
    assert isinstance(cfg, RunConfig)
    assert cfg.stages[0].objective.mntp.mask_probability == 0.2
    assert cfg.stages[1].data.batch_size == 8
    assert cfg.stages[0].optimizer.betas == (0.9, 0.999)


def test_overrides_by_index_and_name(tmp_path):
    cfg = load_config(write(tmp_path), ["stages.0.steps=3", "stages.simcse.optimizer.lr=1e-3", "pooling.mode=last"])
    assert cfg.stages[0].steps == 3
    assert cfg.stages[1].optimizer.lr == pytest.approx(1e-3)
    assert cfg.pooling.mode == "last"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.pth=x", "model.pth: unknown key"),
        ("stages.0.steps=ten", "stages[0].steps: expected an integer"),
        ("pooling.mode=max", "pooling.mode: 'max' is not allowed; choose one of"),
        ("stages.nope.steps=1", "no list item 'nope'"),
        ("stages.0.objective.kind=bert", "stages[0].objective.kind"),
        ("stages.0.optimizer.betas=[0.9]", "expected 2 items"),
    ],
)
def test_errors_name_file_and_field(tmp_path, override, fragment):
    path = write(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert fragment in str(err.value)
    assert "stages.nope" in override or str(path) in str(err.value)


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="model: required field is missing"):
        load_config(write(tmp_path, "output_dir: x\nstages: []\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2"))


def test_duplicate_stage_names_rejected(tmp_path):
    text = BASE.replace("name: simcse", "name: mntp")
    with pytest.raises(ConfigError, match="stage names must be unique"):
        load_config(write(tmp_path, text))


def test_shipped_recipes_load():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml")):
        load_config(path)
