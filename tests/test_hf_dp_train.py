"""`engine: hf` data-parallel under torchrun: 2 ranks split the shards, average gradients, gather
contrastive negatives across ranks, and a stop + resume reproduces the uninterrupted run exactly."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers import losses, torchrun, two_stage_recipe

pytestmark = pytest.mark.slow


def test_hf_engine_data_parallel_resume_is_exact(tmp_path):
    cfg_path = two_stage_recipe(tmp_path)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["engine"] = "hf"
    for stage in cfg["stages"]:  # one shard per dataset: 2 ranks need resampled streams
        stage["data"]["mode"] = "resampled"
    cfg_path.write_text(yaml.safe_dump(cfg))
    full, sliced = tmp_path / "full", tmp_path / "sliced"
    a = torchrun("train", str(cfg_path), f"output_dir={full}")
    assert a.returncode == 0, a.stderr[-4000:]
    b = torchrun("train", str(cfg_path), f"output_dir={sliced}", "--stop-after-steps", "3")
    assert b.returncode != 0 and "stopped at step 3" in b.stderr, b.stderr[-4000:]
    c = torchrun("train", str(cfg_path), f"output_dir={sliced}")
    assert c.returncode == 0, c.stderr[-4000:]
    want, got = losses(full), losses(sliced)
    assert len(want) == 7 and got == want  # same layout: bit-identical trajectory
    assert (full / "01-supervised" / "final" / "embedforge.json").is_file()
