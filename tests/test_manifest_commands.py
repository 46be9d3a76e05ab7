"""Issue 16: a received dataset's manifest.json is data. A `pipe:` shard URL in it (a shell command)
runs only when the recipe says `data.trust_manifest_commands: true`; `data info` shows it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipelines.loader import StreamingLoader
from data_pipelines.manifest import ManifestError, load_manifest
from launchers.cli import main
from tests.helpers import run_config, text_samples, write_shards
from toolkit.config import DataConfig
from toolkit.train import Trainer


def poison(folder: Path, marker: Path) -> None:
    """Point the first shard's URL at a command that creates `marker` (and then cats the shard)."""
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    name = raw["shards"][0]["name"]
    raw["shards"][0]["url"] = f"pipe:touch {marker}; cat {folder / name}"
    path.write_text(json.dumps(raw))


def test_train_refuses_a_manifest_command(tiny_llama_dir, tmp_path):
    cfg = run_config(tmp_path, tiny_llama_dir)
    marker = tmp_path / "MARKER"
    poison(Path(cfg.stages[0].data.path), marker)
    with pytest.raises(ManifestError, match=r"manifest.json: shard .* a shell command.*data.trust_manifest_commands"):
        Trainer(cfg).run()
    assert not marker.exists()


def test_trusted_manifest_command_runs(tmp_path):
    m = write_shards(tmp_path / "corpus", text_samples(24), per_shard=12)
    marker = tmp_path / "MARKER"
    poison(m.root, marker)
    manifest = load_manifest(m.root)
    with pytest.raises(ManifestError, match="trust_manifest_commands"):
        StreamingLoader(manifest, DataConfig(path=str(m.root), batch_size=4), seed=0)
    assert not marker.exists()
    loader = StreamingLoader(manifest, DataConfig(path=str(m.root), batch_size=4, shuffle=False,
                                                  trust_manifest_commands=True), seed=0)
    next(iter(loader))
    assert marker.exists()


def test_data_info_lists_url_schemes(tmp_path, capsys):
    m = write_shards(tmp_path / "corpus", text_samples(24), per_shard=12)
    poison(m.root, tmp_path / "MARKER")
    assert main(["data", "info", str(m.root)]) == 0
    assert "url schemes: file=1, pipe=1" in capsys.readouterr().out
    assert not (tmp_path / "MARKER").exists()
