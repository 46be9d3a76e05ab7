"""The scale presets' documented variants (configs/scale/*.yaml comments) plan as documented, and the
engine accepts every one the planner accepts.

A variant is an `embedforge plan CONFIG ...` command in a preset's comments (continued over `\\`
lines), or a backticked list of overrides / flags applied to the preset's own `Plan:` command. A
variant "claims to fit" when it is the `Plan:` line or when its comment states a size (`~N GiB`)
right after it (or "~N GiB per GPU," right before it); then the planner must say it fits and its peak must be that size (the comments are
rounded: within 10% or 1 GiB). Every variant the planner accepts must pass the engine's own
pre-flight (toolkit.engines.spec.validate_run) and build on the meta device: the dry run (toolkit.dry_run)
runs the engine's real build of the last pipeline stage (which holds the heads) for it, and
also fits where the comment says so.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from launchers.cli import build_parser
from tests.helpers import subprocess_env
from toolkit.config import ConfigError, load_config
from toolkit.engines.spec import validate_run
from toolkit.planner import GIB, load_arch, plan_run

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "scale").glob("*.yaml"))
TOP_LEVEL = ("parallel.", "model.", "pooling.", "stages.", "zero.", "train.", "checkpoint.")
CLAIM = re.compile(r"^[`)\s]*[:,(]?\s*~\s*(\d+(?:\.\d+)?)\s*GiB")  # `...`: ~43 GiB
BEFORE = re.compile(r"~\s*(\d+(?:\.\d+)?)\s*GiB per GPU,\s*$")  # (288 GPUs, ~51 GiB per GPU, `...`)


@dataclass(frozen=True)
class Variant:
    preset: Path
    argv: tuple[str, ...]  # `embedforge` arguments: plan CONFIG ...
    claim_gib: float | None  # the size the comment states (None: no size stated)
    claims_fit: bool

    @property
    def id(self) -> str:
        return f"{self.preset.stem}:{' '.join(self.argv[2:]) or 'as is'}"


def _comments(path: Path) -> str:
    """The comment block of a preset, `#` removed, lines joined (backslash continuations undone)."""
    lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    return re.sub(r"\\\s*\n\s*", " ", "\n".join(lines)).replace("\n", " ")


def _is_override_list(tokens: list[str]) -> bool:
    """A fragment the CLI would take after CONFIG: overrides of recipe fields and --flags (+ their values)."""
    if not tokens or not any(t.startswith(TOP_LEVEL) or t.startswith("--") for t in tokens):
        return False
    return all(t.startswith(TOP_LEVEL) and "=" in t or t.startswith("--") or
               (i > 0 and tokens[i - 1].startswith("--") and "=" not in t) for i, t in enumerate(tokens))


def variants(preset: Path) -> list[Variant]:
    text = _comments(preset)
    rel = preset.relative_to(ROOT).as_posix()
    commands = re.findall(r"embedforge (plan \S+\.yaml[^#]*?)(?=\s+#|\s+The |\s+Train:|$|\s*\()", text)
    plan_line = re.search(r"Plan:\s+embedforge (plan \S+\.yaml.*?)\s+Train:", text)
    assert plan_line, f"{rel}: no 'Plan: embedforge plan ...' line"
    base = shlex.split(plan_line[1])
    out = [Variant(preset, tuple(base), None, True)]
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv == base:
            continue
        tail = text[text.index(cmd) + len(cmd):]
        claim = CLAIM.search(tail[:40])
        out.append(Variant(preset, tuple(argv), float(claim[1]) if claim else None, True))
    for match in re.finditer(r"`([^`]+)`", text):
        tokens = shlex.split(match[1])
        if tokens[:1] == ["embedforge"] or not _is_override_list(tokens):
            continue
        claim = CLAIM.search(text[match.end():match.end() + 40]) or BEFORE.search(text[max(0, match.start() - 40):match.start()])
        out.append(Variant(preset, tuple(base + tokens), float(claim[1]) if claim else None, claim is not None))
    for v in out:
        assert v.argv[1] == rel, f"{rel}: a documented command plans {v.argv[1]}"
    return out


ALL = [v for preset in PRESETS for v in variants(preset)]
# Documented variants the code does not deliver yet, each with its reason; strict: one that starts
# passing fails here until its entry is removed.
KNOWN_GAPS: dict[str, str] = {}  # variant id -> why a documented claim does not hold yet (strict xfail)
DRY_RUN_GAPS: dict[str, str] = {}  # variants whose dry run differs from the plan (none now)


def _params(vs: list[Variant], gaps: dict[str, str] = KNOWN_GAPS) -> list:
    return [pytest.param(v, id=v.id, marks=[pytest.mark.xfail(strict=True, reason=gaps[v.id])]
                         if v.id in gaps else []) for v in vs]


def _overrides(args) -> list[str]:
    """The variant's overrides, with --distributed-optimizer switched on in the recipe as `embedforge plan` does."""
    return [*args.overrides, *(["parallel.distributed_optimizer=true"] if args.distributed_optimizer else [])]


def _plan(v: Variant):
    args = build_parser().parse_args(list(v.argv))
    cfg = load_config(ROOT / args.config, _overrides(args))
    arch, source = load_arch(cfg, ROOT / args.config, args.arch)
    plans = plan_run(cfg, arch, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, stage=args.stage,
                     negatives=args.negatives, distributed_optimizer=args.distributed_optimizer,
                     reserve_gib=args.reserve)
    return cfg, arch, source, plans


def test_every_preset_documents_its_layout_and_variants():
    assert set(KNOWN_GAPS) | set(DRY_RUN_GAPS) <= {v.id for v in ALL}, "a gap entry names no documented variant"
    assert len(PRESETS) >= 3 and {p.stem for p in PRESETS} >= {"llama3-8b", "llama3-70b", "llama3.1-405b"}
    for preset in PRESETS:
        vs = variants(preset)
        assert vs[0].claims_fit and len(vs) >= 2, f"{preset.name}: only {len(vs)} documented variant(s)"


def test_the_parser_finds_override_fragments_and_claims():
    """The parser is what makes the walk meaningful: check it on a known comment."""
    assert _is_override_list(["parallel.pp=1", "stages.mntp.data.batch_size=4"])
    assert _is_override_list(["--gpus", "288", "stages.supervised.data.batch_size=128"])
    assert not _is_override_list(["lora.enabled=false"]) and not _is_override_list(["objective.gradcache_chunk_size"])
    assert CLAIM.search("`: ~43 GiB)")[1] == "43" and CLAIM.search("` (~57 GiB")[1] == "57"
    seventy = {v.id: v for v in variants(ROOT / "configs/scale/llama3-70b.yaml")}
    pp1 = next(v for k, v in seventy.items() if "parallel.pp=1" in k)
    assert pp1.claims_fit and pp1.claim_gib == 43


@pytest.mark.parametrize("v", _params(ALL))
def test_documented_variant_plans_as_documented_and_the_engine_accepts_it(v: Variant):
    try:
        cfg, arch, _, plans = _plan(v)
    except ConfigError as exc:
        assert not v.claims_fit, f"{v.id}: documented to fit, but the planner refuses it: {exc}"
        return
    validate_run(cfg, arch)  # the engine's own pre-flight accepts what the planner accepted
    if v.claims_fit:
        for plan in plans:
            assert plan.fits, f"{v.id}: stage {plan.stage} does not fit ({plan.peak.total / GIB:.1f} GiB)"
    if v.claim_gib is not None:
        peak = max(p.peak.total for p in plans) / GIB
        assert abs(peak - v.claim_gib) <= max(1.0, 0.1 * v.claim_gib), \
            f"{v.id}: the comment says ~{v.claim_gib:g} GiB, the planner {peak:.1f} GiB"


# One fresh process builds every accepted variant's last-stage rank (the dry run owns the process
# group: a fake one of the variant's world size, which no other test's group may precede).
BUILD_SCRIPT = """
import json, sys
from transformers import AutoConfig
from toolkit.config import load_config
from toolkit.distributed.parallel_dims import ParallelDims
from toolkit.dry_run import dry_run_rank

out = []
for config, overrides, gpus, source in json.loads(sys.argv[1]):
    cfg = load_config(config, overrides)
    dims = ParallelDims.from_config(cfg.parallel, gpus, 0)
    rank = dims.rank_of(dp=0, tp=0, pp=dims.pp - 1)
    out.append(dry_run_rank(cfg, AutoConfig.from_pretrained(source), gpus=gpus, rank=rank, source=source))
print("BUILT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, int]]]:
    """Variant id -> state_bytes per training stage of its last pipeline stage's rank (accepted variants)."""
    jobs, ids = [], []
    for v in ALL:
        try:
            _, _, source, plans = _plan(v)
        except ConfigError:
            continue
        args = build_parser().parse_args(list(v.argv))
        jobs.append((str(ROOT / args.config), _overrides(args), plans[0].gpus, source))
        ids.append(v.id)
    out = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                         cwd=ROOT, env=subprocess_env(), timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("BUILT "))
    return dict(zip(ids, json.loads(line[6:])))


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("v", _params(ALL, {**KNOWN_GAPS, **DRY_RUN_GAPS}))
def test_documented_variant_builds_in_the_engine_and_dry_runs_to_fit(v: Variant, built):
    """The engine's real build (meta device, fake world of the variant's size) of the last stage's rank."""
    try:
        cfg, _, _, plans = _plan(v)
    except ConfigError as exc:
        assert not v.claims_fit, f"{v.id}: documented to fit, but the planner refuses it: {exc}"
        return  # refused before any engine is built, as documented
    by_name = {p.stage: p for p in plans}
    for stage, state in zip(cfg.stages, built[v.id]):
        if stage.name not in by_name:
            continue
        sm = by_name[stage.name].stages[-1]
        total = sum(state.values()) + sm.activations + sm.reserve
        assert sum(state.values()) == pytest.approx(sm.weights + sm.grads + sm.optimizer, rel=0.02), v.id
        if v.claims_fit:
            assert total <= plans[0].gpu_mem_gib * GIB, f"{v.id}: stage {stage.name} dry-runs to {total / GIB:.1f} GiB"
