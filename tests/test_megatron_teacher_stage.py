"""The teacher fine-tuning stage (`objective.kind: teacher`) on the megatron engine equals the hf engine's.

Full fine-tuning of the tiny chat teacher (listwise loss, a symmetric task, non-default answer
words), 4 steps of 2 queries with 2 hard negatives each:
- megatron at TP 2 and at PP 2 (right-padded prompts under a causal mask, each row's last real
  position read onto the yes / no rows of the vocabulary-parallel LM head) gives the hf engine's
  per-step losses within 1e-5 (so the gradients agree: any difference would move later losses) and
  its merged weights within 1e-5 (but a few elements where Adam amplifies rounding, see below);
- the megatron run's final folder is an HF causal LM with the prompt it learned, and
  `embedforge teacher score` reads it to the hf run's folder's scores within 1e-5; its step-2
  checkpoint exports (one process, streamed) to the same weights as the hf run's step-2 export;
- a LoRA run at TP 2 with sequence parallelism, stopped at step 2 and resumed at PP 2 (adapters and
  Adam moments resharded), ends as the uninterrupted run does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import run_embedforge, torchrun
from tests.test_teacher_finetune import _recipe

pytestmark = pytest.mark.slow
FULL_FT = ["stages.teacher.lora.enabled=false", "stages.teacher.optimizer.lr=1e-3"]


def causal_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a teacher folder as the causal LM holds it (a tied head included as the head)."""
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def assert_same_teacher(want: Path, got: Path, tol: float = 1e-5) -> None:
    """Equal weights: all but a few elements within `tol`, none off by an Adam step (lr 1e-3).

    Adam divides by sqrt(v): where a gradient element is ~0, fp32 summation-order differences
    between the engines flip its update's sign, a difference of up to ~lr in that one element."""
    a, b = causal_state(want), causal_state(got)
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float(diffs.max()) <= 1e-3 and int((diffs > tol).sum()) <= diffs.numel() // 1000, (
        got, float(diffs.max()), int((diffs > tol).sum()), diffs.numel())


def assert_same_losses(want_run: Path, got_run: Path, tol: float) -> None:
    from tests.helpers import losses

    want, got = losses(want_run), losses(got_run)
    assert want.keys() == got.keys() and len(want) == 4, got
    for key, value in want.items():
        assert abs(got[key] - value) <= tol * max(1.0, abs(value)), (got_run.name, key, got[key], value)


@pytest.mark.timeout(1500)  # 6 training runs, 2 exports, 2 scorings
def test_megatron_teacher_stage_equals_hf(teacher_dir, pairs, tmp_path):
    from tests.test_teacher_job import read_all

    recipe = _recipe(tmp_path, teacher_dir, pairs)
    hf = tmp_path / "hf"
    r = run_embedforge("train", str(recipe), f"output_dir={hf}", *FULL_FT)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, overrides in [("tp2", ["parallel.tp=2"]), ("pp2", ["parallel.pp=2"])]:
        run = tmp_path / name
        r = torchrun("train", str(recipe), f"output_dir={run}", "engine=megatron", *FULL_FT, *overrides)
        assert r.returncode == 0, (name, r.stderr[-4000:])
        assert_same_losses(hf, run, 1e-5)
        assert_same_teacher(hf / "00-teacher" / "final", run / "00-teacher" / "final")
    final = tmp_path / "tp2" / "00-teacher" / "final"
    spec = json.loads((final / "embedforge.json").read_text())
    assert spec["kind"] == "teacher" and spec["prompt"]["yes"] == "y" and spec["symmetric_tasks"] == ["t2"]

    # the folder scores through `teacher score` (its own prompt and symmetric tasks) as the hf one does
    scores = {}
    for name, folder in (("hf", hf / "00-teacher" / "final"), ("megatron", final)):
        out = tmp_path / f"scored-{name}"
        s = run_embedforge("teacher", "score", "--model", str(folder), "--input", str(pairs), "--output", str(out),
                           "--group-size", "3")
        assert s.returncode == 0, s.stderr[-3000:]
        scores[name] = read_all(out)
    assert scores["hf"].keys() == scores["megatron"].keys() and len(scores["hf"]) == 16
    for key, row in scores["hf"].items():
        assert scores["megatron"][key]["scores"] == pytest.approx(row["scores"], abs=1e-5), key

    # a step checkpoint of the megatron run exports (streamed, one process) as the hf run's step does
    exported = {}
    for name, run in (("hf", hf), ("megatron", tmp_path / "tp2")):
        exported[name] = tmp_path / f"step2-{name}"
        x = run_embedforge("export", "--checkpoint", str(run / "00-teacher" / "step-2"), "--output",
                           str(exported[name]))
        assert x.returncode == 0, x.stderr[-3000:]
    assert json.loads((exported["megatron"] / "embedforge.json").read_text())["prompt"]["yes"] == "y"
    assert_same_teacher(exported["hf"], exported["megatron"])

    # LoRA, stopped at TP 2 with sequence parallelism, resumed at PP 2
    whole, sliced = tmp_path / "lora-whole", tmp_path / "lora-sliced"
    sp = ["parallel.tp=2", "parallel.sequence_parallel=true"]
    r = torchrun("train", str(recipe), f"output_dir={whole}", "engine=megatron", *sp)
    assert r.returncode == 0, r.stderr[-4000:]
    r = torchrun("train", str(recipe), f"output_dir={sliced}", "engine=megatron", *sp, "--stop-after-steps", "2")
    assert r.returncode != 0 and "stopped at step 2" in r.stderr, r.stderr[-4000:]
    r = torchrun("train", str(recipe), f"output_dir={sliced}", "engine=megatron", "parallel.pp=2")
    assert r.returncode == 0 and "resharded" in r.stderr, r.stderr[-4000:]
    assert_same_losses(whole, sliced, 1e-4)
    assert_same_teacher(whole / "00-teacher" / "final", sliced / "00-teacher" / "final", 1e-4)
    base = causal_state(teacher_dir)
    moved = causal_state(whole / "00-teacher" / "final")
    assert max(float((moved[k] - base[k]).abs().max()) for k in base) > 1e-4  # the merged adapters trained it
