"""Sweep planning (checkpoints placed on the run's global step axis), the report files (CSV,
Markdown, PNG plots) and `eval compare`'s verdict, without running any model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import EMBEDFORGE
from toolkit.eval.compare import compare_files
from toolkit.eval.sweep import SweepJob, expand_models, plan_jobs, read_jobs, write_jobs
from toolkit.eval.sweep_report import ResultRow, read_rows, write_report


def fake_run(tmp_path: Path) -> Path:
    """A run directory's layout (config.yaml, NN-stage/step-N/COMPLETE, final/embedforge.json)."""
    run = tmp_path / "qs"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"stages": [{"name": "mntp", "steps": 10},
                                                                {"name": "simcse", "steps": 8}]}))
    for stage, steps in (("00-mntp", (5, 10)), ("01-simcse", (4, 8))):
        for s in steps:
            (run / stage / f"step-{s}").mkdir(parents=True)
            (run / stage / f"step-{s}" / "COMPLETE").write_text("")
    (run / "01-simcse" / "step-9").mkdir()  # incomplete: never evaluated
    (run / "01-simcse" / "final").mkdir()
    (run / "01-simcse" / "final" / "embedforge.json").write_text("{}")
    return run


def test_checkpoints_are_placed_on_the_global_step_axis(tmp_path):
    run = fake_run(tmp_path)
    models = expand_models(["minilm"], [f"{run}/*/step-*", str(run / "01-simcse" / "final")])
    assert [(m.label, m.step) for m in models] == [
        ("minilm", None), ("qs/mntp/step-5", 5), ("qs/mntp/step-10", 10), ("qs/simcse/step-4", 14),
        ("qs/simcse/step-8", 18), ("qs/simcse/final", 18)]
    jobs = plan_jobs(models, ["a", "b", "c"], tasks_per_job=2)
    assert len(jobs) == 12 and jobs[0].tasks == ("a", "b") and jobs[1].tasks == ("c",)
    write_jobs(jobs, tmp_path / "jobs.json")
    assert read_jobs(tmp_path / "jobs.json") == jobs and isinstance(jobs[0], SweepJob)
    with pytest.raises(FileNotFoundError, match="matches nothing"):
        expand_models([], [f"{run}/*/step-99*"])
    with pytest.raises(FileNotFoundError, match="not an encoder folder"):
        expand_models([str(tmp_path)], [])
    with pytest.raises(ValueError, match="twice"):
        expand_models(["minilm", "minilm"], [])


def rows(shift: float = 0.0) -> list[ResultRow]:
    out = [ResultRow("minilm", t, s, "ndcg_at_10") for t, s in (("retrieval", 44.3), ("sentiment", 71.0))]
    for step, base in ((5, 10.0), (10, 12.0), (18, 15.0)):
        for task in ("retrieval", "sentiment"):
            out.append(ResultRow(f"qs/x/step-{step}", task, base + shift + (60 if task == "sentiment" else 0),
                                 "ndcg_at_10", run="qs", stage="x", step=step))
    return out


def test_report_files(tmp_path):
    files = write_report(rows(), tmp_path / "report")
    assert read_rows(files["json"]) == rows()
    md = files["markdown"].read_text()
    assert "| minilm | 44.30 | 71.00 |" in md and "| qs/x/step-18 | 15.00 | 75.00 |" in md
    assert files["csv"].read_text().count("\n") == 1 + len(rows())
    for png in (files["steps_plot"], files["heatmap"]):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_compare_flags_drops_and_missing_tasks(tmp_path):
    base, same, worse = tmp_path / "base.json", tmp_path / "same.json", tmp_path / "worse.json"
    for path, data in ((base, rows()), (same, rows(-0.5)), (worse, rows(-3.0)[:-1])):
        path.write_text(json.dumps({"rows": [r.__dict__ for r in data]}))
    text, ok = compare_files(base, same, threshold=1.0)
    assert ok and "no task dropped" in text
    text, ok = compare_files(base, worse, threshold=1.0)
    assert not ok and "REGRESSION" in text and "missing" in text
    r = subprocess.run([EMBEDFORGE, "eval", "compare", str(base), str(worse), "--threshold", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "qs/x/step-10 / retrieval" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([EMBEDFORGE, "eval", "compare", str(base), str(same)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([EMBEDFORGE, "eval", "compare", str(base), str(tmp_path / "nope.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nope.json: results file not found" in r.stderr
