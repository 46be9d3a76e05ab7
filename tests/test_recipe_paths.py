"""Issue 20, item 5: relative paths inside a recipe resolve against the recipe's folder (model.path,
data.path, objective.teacher.prompt_file); output_dir and command-line overrides stay relative to the
current directory; the quickstart's recipe is found from any directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from launchers.cli import build_parser
from toolkit.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def write_recipe(folder: Path, **stage_extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.yaml").write_text(yaml.safe_dump({"yes": "oui", "no": "non"}))
    file = folder / "recipe.yaml"
    file.write_text(yaml.safe_dump({
        "output_dir": "runs/out",
        "model": {"path": "../models/tiny", "bidirectional": False},
        "stages": [{"name": "teach", "steps": 1, "data": {"path": "data/mined"},
                    "objective": {"kind": "teacher", "teacher": {"prompt_file": "prompt.yaml"}}, **stage_extra}],
    }))
    return file


def test_recipe_paths_resolve_against_its_folder_from_any_directory(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "project" / "configs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(recipe)
    assert cfg.model.path == str(tmp_path / "project" / "models" / "tiny")
    assert cfg.stages[0].data.path == str(tmp_path / "project" / "configs" / "data" / "mined")
    assert cfg.stages[0].objective.teacher.prompt.yes == "oui"  # prompt.yaml beside the recipe, read from elsewhere
    assert cfg.output_dir == "runs/out"  # where the run writes: the current directory's choice


def test_recipe_paths_are_absolute_however_the_recipe_is_named(tmp_path, monkeypatch):
    """`configs/x.yaml` here, its absolute path (`submit slurm`) or a path from elsewhere (a Ray
    working directory): the same recorded paths, so a run continues under any launcher."""
    recipe = write_recipe(tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    relative = load_config("configs/recipe.yaml")
    absolute = load_config(recipe)
    monkeypatch.chdir(tmp_path / "configs")
    beside = load_config("recipe.yaml")
    want = (str(tmp_path / "models" / "tiny"), str(tmp_path / "configs" / "data" / "mined"))
    for cfg in (relative, absolute, beside):
        assert (cfg.model.path, cfg.stages[0].data.path) == want


def test_a_run_recorded_with_relative_paths_resumes_with_absolute_ones(tmp_path, monkeypatch):
    """Runs recorded before recipe paths were made absolute (`data/mined`, from the run's directory)
    resume: a path setting compares the file it names, not its spelling."""
    from toolkit.run_settings import fingerprint_settings, settings_changes

    recipe = write_recipe(tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    new = fingerprint_settings(load_config(recipe))
    old = {**new, "model.path": "models/tiny", "stages.teach.data.path": "configs/data/mined"}
    assert settings_changes(old, new) == []
    moved = {**old, "stages.teach.data.path": "other/mined"}
    assert [c["key"] for c in settings_changes(moved, new)] == ["stages.teach.data.path"]
    assert settings_changes({**new, "model.path": "asset:x"}, {**new, "model.path": "asset:y"})  # not paths


def test_overrides_absolute_and_special_paths_are_kept(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(recipe, ["stages.teach.data.path=local/data", "model.path=asset:smollm2-135m-instruct"])
    assert (cfg.stages[0].data.path, cfg.model.path) == ("local/data", "asset:smollm2-135m-instruct")
    for value in ("/abs/data", "asset:nlp-corpus", "~/data", "s3://bucket/data", "pipe:cat x"):
        data = yaml.safe_load(recipe.read_text())
        data["stages"][0]["data"]["path"] = value
        recipe.write_text(yaml.safe_dump(data))
        assert load_config(recipe).stages[0].data.path == value


def test_a_runs_recorded_config_is_not_resolved_again(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "prompt.yaml").write_text("{}")
    data = yaml.safe_load(write_recipe(tmp_path / "c").read_text())
    data["stages"][0]["objective"]["teacher"] = {}
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(run / "config.yaml", relative_to_recipe=False)  # as export and resume read it
    assert (cfg.model.path, cfg.stages[0].data.path) == ("../models/tiny", "data/mined")


@pytest.mark.parametrize("recipe", sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml")))
def test_shipped_recipes_mean_the_same_from_another_directory(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    at_root = load_config(recipe)
    monkeypatch.chdir(tmp_path)
    elsewhere = load_config(ROOT / recipe)

    def paths(cfg, base: Path) -> list[str]:
        values = [cfg.model.path, *(s.data.path for s in cfg.stages)]
        return [v if ":" in v else str((base / v).resolve()) for v in values]

    assert paths(elsewhere, tmp_path) == paths(at_root, ROOT)
    assert at_root.output_dir == elsewhere.output_dir and not os.path.isabs(at_root.output_dir)


def test_quickstart_recipe_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["quickstart"])
    assert Path(args.config).is_file() and Path(args.config).is_absolute()
    cfg = load_config(args.config, args.overrides)
    assert cfg.output_dir == "runs/quickstart" and cfg.model.path.startswith("asset:")


def test_a_path_that_exists_only_from_the_current_directory_is_named(tmp_path, monkeypatch):
    """What a relative recipe path meant before (the current directory's) is refused in one line naming
    both places, not read from the recipe's folder where nothing is."""
    recipe = write_recipe(tmp_path / "configs")
    (tmp_path / "data" / "mined").mkdir(parents=True)  # the old, current-directory meaning of data/mined
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"recipe.yaml: stages\[0\]\.data\.path: 'data/mined' is read from the "
                                         r"recipe's folder, where .*configs/data/mined does not exist; .*/data/mined "
                                         r"\(from the current directory\) does"):
        load_config(recipe)
    (tmp_path / "configs" / "data" / "mined").mkdir(parents=True)  # once beside the recipe: no doubt left
    assert load_config(recipe).stages[0].data.path == str(tmp_path / "configs" / "data" / "mined")
