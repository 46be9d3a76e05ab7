"""EmbedforgeError: an expected failure is one line from the CLI (exit 2), a bug keeps its traceback."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launchers.cli import EXIT_USAGE, main
from toolkit.errors import EmbedforgeError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("toolkit", "data_pipelines", "launchers", "cluster")


def run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "launchers.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def one_line_error(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode == EXIT_USAGE, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def test_missing_dataset_folder_is_one_line(tmp_path):
    folder = tmp_path / "no-such-shards"
    line = one_line_error(run("data", "info", str(folder)), str(folder), "manifest.json")
    assert line.startswith("embedforge data info: error: ")


def test_bad_recipe_field_is_one_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path / "model")},
        "stages": [{"name": "s", "objective": {"kind": "simcse", "temprature": 0.1}, "steps": 1,
                    "data": {"path": str(tmp_path / "shards")}}],
    }))
    one_line_error(run("train", str(recipe)), str(recipe), "stages[0].objective.temprature: unknown key")


def test_existing_output_is_one_line_in_process(tmp_path, capsys):
    out = tmp_path / "exported"
    out.mkdir()
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--output", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"embedforge export: error: {out}: already exists; pass --overwrite to replace it"]


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyError("boom"), FileNotFoundError("boom"),
                                 RuntimeError("boom")])
def test_internal_bug_propagates_in_process(tmp_path, monkeypatch, exc):
    import data_pipelines.manifest

    def broken(folder):
        raise exc

    monkeypatch.setattr(data_pipelines.manifest, "load_manifest", broken)
    with pytest.raises(type(exc), match="boom"):
        main(["data", "info", str(tmp_path)])


def test_internal_bug_keeps_its_traceback(tmp_path):
    code = ("import sys, data_pipelines.manifest as m\n"
            "def broken(folder):\n"
            "    raise ValueError('boom')\n"
            "m.load_manifest = broken\n"
            "from launchers.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    out = run("data", "info", str(tmp_path), code=code)
    assert out.returncode not in (0, EXIT_USAGE)
    assert "Traceback" in out.stderr and "ValueError: boom" in out.stderr
    assert "error: boom" not in out.stderr


def test_every_project_error_is_an_embedforge_error():
    found = {}
    for name in PACKAGES:
        package = importlib.import_module(name)
        modules = [package] + [importlib.import_module(m.name)
                               for m in pkgutil.walk_packages(package.__path__, f"{name}.")]
        for module in modules:
            for cls_name, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == module.__name__ and issubclass(cls, BaseException):
                    found[f"{module.__name__}.{cls_name}"] = cls
    assert {"toolkit.config_schema.ConfigError", "data_pipelines.writer.BuildError", "cluster.ray_group.TrainingFailed",
            "launchers.slurm.SubmitError", "toolkit.errors.CheckpointError"} <= set(found)
    assert [n for n, cls in found.items() if not issubclass(cls, EmbedforgeError)] == []


def test_errors_module_imports_nothing_from_the_project():
    source = (ROOT / "toolkit" / "errors.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["from __future__ import annotations"]
