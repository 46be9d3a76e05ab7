"""Issue 16: `final/` and export folders are readable by the team, as a plain mkdir / open would
make them under the user's umask (not mkdtemp's private 0700)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from toolkit.atomic import atomic_dir


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_atomic_dir_follows_the_umask(tmp_path, umask_022):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "weights.bin").write_bytes(b"x")
        (tmp / "sub").mkdir()
    got = modes(tmp_path / "out")
    assert got == {".": 0o755, "weights.bin": 0o644, "sub": 0o755}


def test_export_is_readable_by_others(tiny_llama_dir, tmp_path, umask_022):
    from tests.helpers import run_config
    from toolkit.engines.export import consolidate
    from toolkit.train import Trainer

    cfg = run_config(tmp_path, tiny_llama_dir, simcse__steps=1, supervised__steps=1)
    trainer = Trainer(cfg)
    trainer.stop_after_steps = 2
    trainer.run()
    out = consolidate(Path(cfg.output_dir) / "00-mntp" / "step-2", tmp_path / "exported")
    got = modes(out)
    assert got and all(m == (0o755 if (out / p).is_dir() else 0o644) for p, m in got.items()), got
    final = Path(cfg.output_dir) / "00-mntp" / "final"
    if final.exists():
        assert all(m == (0o755 if (final / p).is_dir() else 0o644) for p, m in modes(final).items())
