"""`embedforge plan --dry-run`: the engine's real per-rank modules (meta device, fake world) against the plan.

For every scale preset at the layout of its `Plan:` line, the sampled ranks' weights, gradients and
optimizer states (counted from the engine's tensors) equal the planner's within 2%. Each dry run
runs in a fresh process (it owns the process group: a fake one of the full world size).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launchers.cli import build_parser
from tests.helpers import run_embedforge, subprocess_env
from tests.test_scale_presets import PRESETS, ROOT, variants
from toolkit.config import ConfigError, load_config
from toolkit.distributed.parallel_dims import ParallelDims
from toolkit.dry_run import COLUMNS, RankBytes, dry_run_rank, sample_ranks

TOLERANCE = 0.02
SCRIPT = """
import dataclasses, json, sys
from launchers.cli import build_parser
from toolkit.config import load_config
from toolkit.dry_run import dry_run
from toolkit.planner import load_arch, plan_run

args = build_parser().parse_args(sys.argv[1:])
cfg = load_config(args.config, args.overrides)
arch, source = load_arch(cfg, args.config, args.arch)
plans = plan_run(cfg, arch, gpus=args.gpus, gpu_mem_gib=args.gpu_mem)
print("ROWS " + json.dumps([dataclasses.asdict(r) for r in dry_run(cfg, source, plans)]))
"""


def run_dry(argv: tuple[str, ...]) -> list[RankBytes]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True, cwd=ROOT,
                         env=subprocess_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("ROWS "))
    return [RankBytes(**r) for r in json.loads(line[5:])]


def layout(preset: Path) -> tuple[str, ...]:
    """The preset's `Plan:` command (its documented layout)."""
    return variants(preset)[0].argv


@pytest.fixture(scope="module")
def rows_70b() -> list[RankBytes]:
    return run_dry(layout(ROOT / "configs/scale/llama3-70b.yaml"))


def check_rows(rows: list[RankBytes], preset: str) -> None:
    roles = {r.role for r in rows}
    assert {"first", "last"} <= roles or roles == {"last"}, f"{preset}: sampled {roles}"
    for r in rows:
        where = f"{preset} stage {r.stage} rank {r.rank} (pp {r.pp_rank}, {r.role})"
        assert r.measured["weights"] > 0 and r.measured["optimizer"] > 0, where
        for c in COLUMNS:
            assert abs(r.ratio(c) - 1) <= TOLERANCE, \
                f"{where}: {c} dry run {r.measured[c]} B vs planned {r.planned[c]:.0f} B (x{r.ratio(c):.4f})"
        assert r.within(TOLERANCE), where
        assert r.fits, f"{where}: {r.total / 2**30:.1f} GiB does not fit in {r.gpu_mem_gib} GiB"


def test_70b_dry_run_equals_the_plan_on_first_and_last_stage(rows_70b):
    assert {r.role for r in rows_70b} == {"first", "last"}  # PP2: the middle stage is the last
    assert {r.stage for r in rows_70b} == {"mntp", "supervised"}
    check_rows(rows_70b, "llama3-70b")


def test_the_check_detects_a_wrong_planner_number(rows_70b):
    """A plan 3% off in any one column (or a column the engine has but the plan misses) fails."""
    row = rows_70b[0]
    assert row.within(TOLERANCE)
    for column in COLUMNS:
        wrong = dataclasses.replace(row, planned={**row.planned, column: row.planned[column] * 1.03})
        assert not wrong.within(TOLERANCE), column
    missing = dataclasses.replace(row, planned={**row.planned, "grads": 0.0})
    assert missing.ratio("grads") == float("inf") and not missing.within(TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p for p in PRESETS if p.stem != "llama3-70b"], ids=lambda p: p.stem)
def test_preset_dry_run_equals_the_plan(preset: Path):
    rows = run_dry(layout(preset))
    check_rows(rows, preset.stem)
    pp = load_config(preset, build_parser().parse_args(list(layout(preset))).overrides).parallel.pp
    assert len({r.pp_rank for r in rows}) == min(pp, 3)


@pytest.mark.slow
def test_cli_dry_run_exit_code_follows_the_comparison(tmp_path):
    """`embedforge plan --dry-run` exits 0 on the 8B preset, 1 when the planner's number is off by 5%."""
    good = run_embedforge("plan", "configs/scale/llama3-8b.yaml", "--gpus", "8", "--dry-run", cwd=ROOT)
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-2000:]
    assert "activations are NOT measured" in good.stdout and "differs from the plan" not in good.stdout
    wrong = tmp_path / "wrong_plan.py"
    wrong.write_text(
        "import sys, toolkit.planner as planner\n"
        "from launchers.cli import main\n"
        "real = planner.plan_stage\n"
        "def off(*a, **k):\n"
        "    plan = real(*a, **k)\n"
        "    for s in plan.stages:\n"
        "        s.optimizer *= 1.05\n"
        "    return plan\n"
        "planner.plan_stage = off\n"
        "sys.exit(main(sys.argv[1:]))\n")
    bad = subprocess.run([sys.executable, str(wrong), "plan", "configs/scale/llama3-8b.yaml", "--gpus", "8",
                          "--dry-run"], capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=600)
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "differs from the plan by more than 2%" in bad.stdout and "optimizer x0.95" in bad.stdout


def test_sampled_ranks_are_first_middle_last_stage_at_tp0_dp0():
    dims = ParallelDims(tp=8, pp=9, dp=1, world_size=72, rank=0)
    assert sample_ranks(dims) == [(0, "first"), (32, "middle"), (64, "last")]
    dims = ParallelDims(tp=8, pp=2, dp=4, world_size=64, rank=0)
    assert sample_ranks(dims) == [(0, "first"), (32, "last")]
    assert sample_ranks(ParallelDims(dp=8, world_size=8, rank=0)) == [(0, "last")]


def test_an_engine_without_a_meta_build_is_refused_in_one_line():
    cfg = load_config(ROOT / "configs/scale/llama3-8b.yaml", ["engine=hf", "parallel.dp=0"])
    with pytest.raises(ConfigError, match="engine=hf: --dry-run"):
        dry_run_rank(cfg, None, gpus=8, rank=0)
