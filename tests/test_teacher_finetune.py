"""Fine-tuning the D2LLM teacher (`objective.kind: teacher`) and scoring with the result.

- The stage's loss equals a hand computation: each (query, candidate) prompt run alone (no padding)
  through the causal LM's full forward, its yes / no logits read from the [vocab] row at the last
  position, then binary cross-entropy (pointwise) or -log softmax of the positive (listwise) written
  out; queries with different numbers of negatives in one batch.
- A teacher recipe (LoRA, 4 steps) stopped after 2 steps and resumed equals the uninterrupted run bit
  for bit (losses and the merged folder); the folder is an HF causal LM that `teacher score` reads with
  the prompt it was trained with (here non-default answer words), locally, under torchrun and on Ray,
  with the scores `Teacher` computes in-process; `export` of its step checkpoint writes a teacher folder.
- A teacher folder is refused as an encoder in one line; a prompt file (a reranker's own format,
  verbatim with special tokens) scores through `--prompt`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import CORPUS, NO, YES, losses, run_embedforge, torchrun
from toolkit.config import ModelConfig, PoolingConfig, StageConfig, TeacherPrompt, config_from_dict

SAMPLES = [
    {"query": CORPUS[0], "positive": CORPUS[1], "negatives": [CORPUS[2]], "instruction": "find the dog", "task": "t1"},
    {"query": CORPUS[3], "positive": CORPUS[4], "negatives": [CORPUS[5], CORPUS[6]], "instruction": "", "task": "t1"},
]


def _stage(loss: str, temperature: float = 0.7) -> StageConfig:
    return config_from_dict({
        "name": "teacher", "steps": 1, "data": {"path": "unused", "max_length": 256},
        "objective": {"kind": "teacher", "teacher": {"loss": loss, "prompt": {"yes": YES, "no": NO,
                                                                                  "temperature": temperature}}}},
        StageConfig)


@pytest.mark.parametrize("loss", ["pointwise", "listwise"])
def test_teacher_loss_equals_a_hand_computation(teacher_dir, loss):
    from transformers import AutoModelForCausalLM

    from toolkit.models.loading import build_encoder
    from toolkit.objectives.steps import build_step
    from toolkit.teacher.scoring import Teacher

    stage = _stage(loss)
    encoder, head = build_encoder(ModelConfig(path=str(teacher_dir), bidirectional=False), PoolingConfig())
    step = build_step(stage, encoder, head, torch.Generator(), data_kind="pair")
    got = step._loss(step.prepare(SAMPLES))

    causal = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    prompt = TeacherPrompt(yes=YES, no=NO, max_length=256)
    teacher = Teacher(causal, encoder.tokenizer, prompt)  # the prompts `teacher score` renders
    per_query = []
    with torch.no_grad():
        for s in SAMPLES:
            query = f"{s['instruction']}\n{s['query']}" if s["instruction"] else s["query"]
            row = []
            for cand in (s["positive"], *s["negatives"]):
                ids = torch.tensor([teacher.render(query, cand, False)])
                logits = causal(input_ids=ids).logits[0, -1]  # the full vocabulary row, one unpadded prompt
                row.append(float(logits[teacher.yes_id] - logits[teacher.no_id]) / 0.7)
            per_query.append(row)
    if loss == "pointwise":
        terms = [-math.log(1 / (1 + math.exp(-z))) if k == 0 else -math.log(1 - 1 / (1 + math.exp(-z)))
                 for row in per_query for k, z in enumerate(row)]
        want = sum(terms) / len(terms)
    else:
        want = sum(-row[0] + math.log(sum(math.exp(z) for z in row)) for row in per_query) / len(per_query)
    assert float(got) == pytest.approx(want, abs=1e-5)
    got.backward()  # the gradient reaches the backbone, not the frozen head
    assert head.weight.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.backbone.parameters())


def test_teacher_recipes_are_causal_and_alone():
    base = {"output_dir": "x", "model": {"path": "m", "bidirectional": False},
            "stages": [{"name": "t", "steps": 1, "data": {"path": "d"}, "objective": {"kind": "teacher"}}]}
    config_from_dict(base)
    with pytest.raises(ValueError, match="model.bidirectional: a teacher .* set model.bidirectional: false"):
        config_from_dict({**base, "model": {"path": "m"}})
    mixed = {**base, "stages": [*base["stages"], {"name": "s", "steps": 1, "data": {"path": "d"},
                                                   "objective": {"kind": "simcse"}}]}
    with pytest.raises(ValueError, match=r"stages: \['t'\] fine-tune a teacher"):
        config_from_dict(mixed)
    two = {**base, "stages": [*base["stages"], {"name": "u", "steps": 1, "data": {"path": "d"},
                                                 "objective": {"kind": "teacher"}}]}
    with pytest.raises(ValueError, match=r"stages: \['t', 'u'\]: a teacher recipe has one teacher stage"):
        config_from_dict(two)
    from toolkit.engines.spec import validate_run

    validate_run(config_from_dict({**base, "engine": "megatron"}))  # causal prompts on the megatron engine
    with pytest.raises(ValueError, match="engine=deepspeed trains"):
        validate_run(config_from_dict({**base, "engine": "deepspeed"}))
    packed = {**base, "stages": [{**base["stages"][0], "data": {"path": "d", "pack": True}}]}
    with pytest.raises(ValueError, match=r"stages\[0\] \(t\)\.data\.pack=true: engine=megatron does not pack"):
        validate_run(config_from_dict({**packed, "engine": "megatron"}))
    causal_encoder = {**base, "model": {"path": "m", "bidirectional": False},
                      "stages": [{"name": "s", "steps": 1, "data": {"path": "d"}, "objective": {"kind": "simcse"}}]}
    with pytest.raises(ValueError, match="engine=megatron: model.bidirectional=false is supported only for a teacher"):
        validate_run(config_from_dict({**causal_encoder, "engine": "megatron"}))


def test_prompt_file_verbatim_reranker_format(teacher_dir, tmp_path):
    """A reranker's own prompt (special tokens, no chat turn, no answer prefix) from a file: rendered
    verbatim, the answer word read right after it."""
    from transformers import AutoTokenizer

    from toolkit.models.yes_no import YesNoPrompter

    file = tmp_path / "reranker.yaml"
    file.write_text(yaml.safe_dump({
        "chat": False, "answer_prefix": "", "yes": YES, "no": NO,
        "asymmetric": "<s>judge: <q> {query} <d> {passage} relevant?\n",
        "symmetric": "<s>same: {query} | {passage} ?\n"}))
    prompt = TeacherPrompt.from_file(file)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    prompter = YesNoPrompter(tok, prompt)
    ids = prompter.render("a query", "a passage", False)
    assert tok.decode(ids) == tok.decode(tok.encode("<s>judge: <q> a query <d> a passage relevant?\n",
                                                    add_special_tokens=False))
    assert prompter.yes_id == tok.encode(YES, add_special_tokens=False)[0]
    with pytest.raises(ValueError, match=r"no-such\.yaml: no such prompt file"):
        TeacherPrompt.from_file(tmp_path / "no-such.yaml")
    # a recipe's prompt_file is read once: the run records the prompt itself (an edited file changes nothing)
    from toolkit.config import TeacherObjectiveConfig, to_dict

    cfg = config_from_dict({"prompt_file": str(file)}, TeacherObjectiveConfig)
    assert cfg.prompt == prompt and cfg.prompt_file == ""
    assert config_from_dict(to_dict(cfg), TeacherObjectiveConfig).prompt == prompt


# ------------------------------------------------------------------------------------------ slow
def _recipe(tmp_path: Path, teacher_dir: Path, pairs: Path) -> Path:
    recipe = tmp_path / "teacher.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "seed": 1, "model": {"path": str(teacher_dir), "bidirectional": False,
                                                                   "max_length": 256},
        "stages": [{"name": "teacher", "steps": 4, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                    "data": {"path": str(pairs), "batch_size": 2, "max_length": 256},
                    "objective": {"kind": "teacher", "teacher": {"loss": "listwise", "symmetric_tasks": ["t2"],
                                                                 "prompt": {"yes": YES, "no": NO}}},
                    "optimizer": {"lr": 5e-3}}],
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False}}))
    return recipe


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_teacher_finetunes_resumes_and_scores_everywhere(teacher_dir, pairs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.models.encoder import Encoder
    from toolkit.teacher.scoring import Teacher

    recipe = _recipe(tmp_path, teacher_dir, pairs)
    whole = run_embedforge("train", str(recipe))
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "run"
    sliced = tmp_path / "sliced"
    a = run_embedforge("train", str(recipe), f"output_dir={sliced}", "--stop-after-steps", "2")
    assert a.returncode != 0 and "stopped at step 2" in a.stderr, a.stderr[-3000:]
    b = run_embedforge("train", str(recipe), f"output_dir={sliced}")
    assert b.returncode == 0, b.stderr[-3000:]
    assert losses(sliced) == losses(run) and len(losses(run)) == 4
    final = run / "00-teacher" / "final"
    want, got = load_file(str(final / "model.safetensors")), load_file(str(sliced / "00-teacher" / "final" /
                                                                          "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    base = load_file(str(Path(teacher_dir) / "model.safetensors"))
    assert any(not torch.equal(want[k], base[k]) for k in want)  # the merged adapter moved the teacher

    # the folder: an HF causal LM with its prompt; not an encoder
    spec = json.loads((final / "embedforge.json").read_text())
    assert spec["kind"] == "teacher" and spec["prompt"]["yes"] == YES and spec["prompt"]["max_length"] == 256
    assert spec["symmetric_tasks"] == ["t2"]
    with pytest.raises(ValueError, match="a fine-tuned teacher .*`embedforge teacher score --model"):
        Encoder.from_pretrained(final)
    reference = Teacher(AutoModelForCausalLM.from_pretrained(final), AutoTokenizer.from_pretrained(final),
                        TeacherPrompt(yes=YES, no=NO, max_length=256))

    def scored(out: Path) -> dict:
        from tests.test_teacher_job import read_all

        return read_all(out)

    # `teacher score` reads the folder's own prompt and symmetric tasks (no flags given): local, torchrun, Ray
    common = ["teacher", "score", "--model", str(final), "--input", str(pairs), "--group-size", "3"]
    local = run_embedforge(*common, "--output", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr[-3000:]
    ranks = torchrun(*common, "--output", str(tmp_path / "ranks"))
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    ray = run_embedforge(*common, "--output", str(tmp_path / "ray"), "--ray", "local", "--workers", "2",
                         env={"RAY_AUTH_MODE": "disabled"}, timeout=900)
    assert ray.returncode == 0, ray.stderr[-3000:]
    rows = {name: scored(tmp_path / name) for name in ("local", "ranks", "ray")}
    assert rows["local"].keys() == rows["ranks"].keys() == rows["ray"].keys() and len(rows["local"]) == 16
    for key, sample in rows["local"].items():
        query = f"{sample['instruction']}\n{sample['query']}" if sample.get("instruction") else sample["query"]
        cands = [sample["positive"], *sample["negatives"]]
        want_scores, _ = reference.score([query] * len(cands), cands, sample["task"] == "t2")
        assert sample["scores"] == pytest.approx(want_scores.tolist(), abs=1e-5), key
        for other in ("ranks", "ray"):
            assert rows[other][key]["scores"] == pytest.approx(sample["scores"], abs=1e-6), (other, key)

    # export of a step checkpoint: a teacher folder too
    out = tmp_path / "exported"
    x = run_embedforge("export", "--checkpoint", str(run / "00-teacher" / "step-2"), "--output", str(out))
    assert x.returncode == 0, x.stderr[-3000:]
    assert json.loads((out / "embedforge.json").read_text())["kind"] == "teacher"
    AutoModelForCausalLM.from_pretrained(out)
    sized = run_embedforge("export", "--checkpoint", str(run / "00-teacher" / "step-2"), "--output",
                           str(tmp_path / "sized"), "--max-seq-length", "64")
    assert sized.returncode == 2 and "--max-seq-length: " in sized.stderr and "teacher stage" in sized.stderr
    assert not (tmp_path / "sized").exists()
