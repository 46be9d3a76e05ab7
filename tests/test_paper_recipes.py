"""Issue 20: the paper-faithful LLM2Vec recipes (configs/llm2vec/paper/) for the published models hold
the paper's hyperparameters, name a source on every value, and pass the pre-flight and the memory plan
on the 8 GPUs they are written for without any model file or data shard present.

The expected values below are the reference implementation's (McGill-NLP/llm2vec train_configs/
{mntp,simcse,supervised}/{MetaLlama3,Mistral,Sheared-Llama}.json, which its README says hold "all the
training hyperparameters and configurations used in our paper", and for a key those files leave unset,
experiments/run_*.py and transformers' TrainingArguments defaults), as METHODS.md section 1 summarises
them. Nothing here trains.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from launchers.cli import build_parser
from toolkit.config import ConfigError, load_config, to_dict
from toolkit.distributed.parallel_dims import ParallelDims
from toolkit.engines.spec import validate_run
from toolkit.models.arch import read_model_args
from toolkit.planner import GIB, load_arch, plan_run

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "llm2vec" / "paper"
GPUS = 8  # the layout the recipes are written for: 8 x A100-80GB, data parallel
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Per model: the reference's base checkpoint, its MNTP masking (mntp/<model>.json mlm_probability and
# data_collator_type: "default" = BERT 80/10/10, "all_mask"; METHODS.md 1.2) and the public shapes of
# the architecture the recipe's `# arch:` line names (the HF config.json of that checkpoint).
MODELS = {
    "llama-3-8b": dict(
        folder="Meta-Llama-3-8B-Instruct", mask=0.2, strategy="bert",
        arch=dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, ffn_hidden_size=14336,
                  vocab_size=128256)),
    "mistral-7b": dict(  # Mistral-7B-Instruct-v0.2 (the reference's): no sliding window (v0.1 had 4096)
        folder="Mistral-7B-Instruct-v0.2", mask=0.8, strategy="all_mask",
        arch=dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, ffn_hidden_size=14336,
                  vocab_size=32000, sliding_window=None)),
    "sheared-llama-1.3b": dict(
        folder="Sheared-LLaMA-1.3B", mask=0.2, strategy="bert",
        arch=dict(num_layers=24, hidden_size=2048, num_heads=16, num_kv_heads=16, ffn_hidden_size=5504,
                  vocab_size=32000)),
}
# Per stage, the same for the three models. lr 5e-5 and warmup 0 of MNTP / SimCSE are TrainingArguments'
# defaults (the json sets no learning_rate for MNTP, no warmup_steps for either); temperature = 1 / loss_scale
# (simcse.json loss_scale 20; run_supervised's default 50); attention dropout: simcse.json simcse_dropout
# 0.3, the model's own 0.0 elsewhere. Global batch = per_device_train_batch_size x GPUs of the reference
# run: MNTP 32 x 1, SimCSE 128 x 1, supervised 64 x 8.
STAGES = {
    "mntp": dict(steps=1000, global_batch=32, max_length=512, lr=5e-5, warmup=0, attention_dropout=0.0),
    "simcse": dict(steps=1000, global_batch=128, max_length=128, lr=3e-5, warmup=0, attention_dropout=0.3,
                   temperature=0.05),
    "supervised": dict(steps=1000, global_batch=512, max_length=512, lr=2e-4, warmup=300, attention_dropout=0.0,
                       temperature=0.02),
}
# The two chains: SimCSE and supervised each start from the merged MNTP model (METHODS.md 1.3, 1.4;
# simcse.json and supervised.json both load the ...-mntp adapter). A stage here starts from the one before
# it, so each model has two recipes.
VARIANTS = {"unsup": ["mntp", "simcse"], "supervised": ["mntp", "supervised"]}
RECIPES = [(model, variant) for model in MODELS for variant in VARIANTS]


def recipe_path(model: str, variant: str) -> Path:
    return PAPER / f"{model}-{variant}.yaml"


def reference_lr_at_stop(total_steps: float, warmup: int, stop: int = 1000) -> float:
    """The fraction of the peak lr HF's linear schedule (warmup, then linear to 0 at `total_steps`) has
    left at `stop`, where the reference's stop_after_n_steps ends the run."""
    return (total_steps - stop) / (total_steps - warmup)


def arch_file(path: Path) -> Path:
    m = re.search(r"^#\s*arch:\s*(\S+)", path.read_text(), re.MULTILINE)
    assert m, f"{path.name}: no '# arch:' line"
    return path.parent / m[1]


def comments(path: Path) -> str:
    """The recipe's comment block, `#` removed, backslash continuations joined."""
    lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    return re.sub(r"\\\s*\n\s*", " ", "\n".join(lines))


def test_every_published_model_has_an_unsup_and_a_supervised_recipe():
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(recipe_path(m, v).name for m, v in RECIPES)


@pytest.mark.parametrize("model,variant", RECIPES)
def test_recipe_holds_the_papers_values(model: str, variant: str):
    cfg = load_config(recipe_path(model, variant))
    want = MODELS[model]
    dp = ParallelDims.from_config(cfg.parallel, GPUS, 0).dp
    assert [s.name for s in cfg.stages] == VARIANTS[variant]
    assert [s.objective.kind for s in cfg.stages] == VARIANTS[variant]
    assert Path(cfg.model.path).name == want["folder"]
    assert cfg.seed == 42 and cfg.engine == "hf"
    assert cfg.model.bidirectional and cfg.model.gradient_checkpointing
    assert cfg.model.dtype == "bfloat16" and cfg.model.attn_implementation == "flash_attention_2"
    assert cfg.model.max_length == 512 and cfg.pooling.mode == "mean"
    for index, stage in enumerate(cfg.stages):
        exp = STAGES[stage.name]
        where = f"{model}-{variant} {stage.name}"
        assert stage.steps == exp["steps"], where
        assert stage.data.batch_size * dp * stage.grad_accum == exp["global_batch"], where
        assert stage.data.max_length == exp["max_length"], where
        assert stage.optimizer.lr == pytest.approx(exp["lr"], rel=1e-12), where
        assert stage.optimizer.weight_decay == 0.0 and stage.optimizer.betas == (0.9, 0.999), where
        assert stage.optimizer.eps == pytest.approx(1e-8) and stage.optimizer.clip_grad == 1.0, where
        assert stage.schedule.warmup_steps == exp["warmup"] and stage.schedule.decay == "linear", where
        assert stage.attention_dropout == exp["attention_dropout"], where
        assert stage.precision == "bf16", where
        lora = stage.lora
        assert (lora.enabled, lora.r, lora.alpha, lora.dropout) == (True, 16, 32, 0.05), where
        assert lora.target_modules == LORA_TARGETS, where
        if "temperature" in exp:
            assert stage.objective.temperature == pytest.approx(exp["temperature"]), where
            assert stage.objective.gradcache_chunk_size == 0, where  # the paper's run: no GradCache on 8 x 80 GB
        if index:
            assert stage.merge_previous, f"{where}: must start from the merged MNTP model"
        if stage.name == "mntp":
            mntp = stage.objective.mntp
            assert mntp.mask_probability == want["mask"], where
            assert mntp.strategy == want["strategy"], where
            assert mntp.mask_token == "underscore", where  # mask_token_type "blank": "_"
            assert not stage.data.length_bucketing, where
        if stage.name == "simcse":
            assert not stage.data.length_bucketing, f"{where}: random batches, as the reference's"
        if stage.name == "supervised":
            assert stage.data.task_weights == {}, where  # one task per batch, tasks by size (E5Data)
            assert cfg.pooling.instruction_template == "{instruction}; ", where


@pytest.mark.parametrize("model", MODELS)
def test_supervised_starts_from_the_same_mntp_as_simcse(model: str):
    """The supervised adapter is trained on MNTP, not on SimCSE: the supervised recipe has no SimCSE stage
    and its MNTP stage is the unsupervised recipe's, value for value."""
    unsup = load_config(recipe_path(model, "unsup"))
    sup = load_config(recipe_path(model, "supervised"))
    assert "simcse" not in [s.name for s in sup.stages]
    assert to_dict(sup.stages[0]) == to_dict(unsup.stages[0])
    assert to_dict(sup.model) == to_dict(unsup.model) and sup.seed == unsup.seed


def test_schedules_end_where_the_reference_is_stopped():
    """The reference's linear decay spans num_train_epochs=3 of its data; stop_after_n_steps ends it at
    1000, so the lr there is a fixed fraction of the peak (min_lr_ratio)."""
    simcse = reference_lr_at_stop(3 * math.ceil(1_000_000 / 128), 0)  # wiki1m: exactly 1M sentences
    supervised = reference_lr_at_stop(3 * 1_500_000 / 512, 300)  # E5 mixture: ~1.5M samples (METHODS.md 1.4)
    mntp = reference_lr_at_stop(3 * 8_000, 0)  # wikitext-103: ~8k blocks of 32 x 512 tokens per epoch
    for model, variant in RECIPES:
        for stage in load_config(recipe_path(model, variant)).stages:
            want = {"mntp": (mntp, 0.01), "simcse": (simcse, 0.001), "supervised": (supervised, 0.005)}[stage.name]
            assert stage.schedule.min_lr_ratio == pytest.approx(want[0], abs=want[1]), (model, variant, stage.name)


@pytest.mark.parametrize("model,variant", RECIPES)
def test_every_value_names_its_source(model: str, variant: str):
    for number, line in enumerate(recipe_path(model, variant).read_text().splitlines(), 1):
        m = re.match(r"^\s*(- )?([A-Za-z_]+):\s*(.*)$", line)
        if not m or not m[3] or m[3].startswith("#") or m[2] == "name":
            continue  # a section header, a comment line, or a stage's name
        value, _, comment = m[3].partition(" #")
        assert comment.strip(), f"{model}-{variant}.yaml:{number}: `{line.strip()}` names no source"
        assert not value.rstrip().endswith("#"), f"{model}-{variant}.yaml:{number}: comment glued to the value"


@pytest.mark.parametrize("model", MODELS)
def test_the_named_architecture_is_the_models(model: str):
    for variant in VARIANTS:
        args = read_model_args(arch_file(recipe_path(model, variant)))
        for field, value in MODELS[model]["arch"].items():
            assert getattr(args, field) == value, (model, field)


@pytest.mark.parametrize("model,variant", RECIPES)
def test_preflight_passes_without_the_model_or_the_data(model: str, variant: str, tmp_path):
    """The engine's pre-flight (toolkit.train.preflight: engine checks, every length against the model's
    context) on a stand-in config.json of the model's architecture, no weights and no shards."""
    from toolkit.train import preflight

    path = recipe_path(model, variant)
    (tmp_path / "config.json").write_text(arch_file(path).read_text())
    cfg = load_config(path, [f"model.path={tmp_path}"])
    preflight(cfg, check_data=False)
    context = json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"]
    too_long = load_config(path, [f"model.path={tmp_path}", f"stages.mntp.data.max_length={context + 1}"])
    with pytest.raises(ConfigError, match="longer than the model's context"):  # the stand-in was read
        preflight(too_long, check_data=False)


def documented_plans(path: Path) -> list[list[str]]:
    """`embedforge plan` argument lists the header documents: its `Plan:` line and every backticked list
    of overrides / flags, applied to that line."""
    text = comments(path).replace("\n", " ")
    plan = re.search(r"Plan:\s+embedforge (plan \S+\.yaml.*?)\s+Train:", text)
    assert plan, f"{path.name}: no 'Plan: embedforge plan ...' line"
    base = shlex.split(plan[1])
    assert base[1] == path.relative_to(ROOT).as_posix() and "--gpus" in base
    out = [base]
    for fragment in re.findall(r"`([^`]+)`", text):
        tokens = shlex.split(fragment)
        if tokens and all(t.startswith(("--", "stages.")) or t[:1].isdigit() for t in tokens):
            out.append(base + tokens)
    return out


@pytest.mark.parametrize("model,variant", RECIPES)
def test_documented_plans_fit_with_the_papers_batches(model: str, variant: str):
    path = recipe_path(model, variant)
    variants = documented_plans(path)
    # the paper's one-GPU run (unsup), the GradCache variants for less memory / one GPU (supervised)
    assert len(variants) == {"unsup": 2, "supervised": 3}[variant], [v[2:] for v in variants]
    for argv in variants:
        args = build_parser().parse_args(argv)
        cfg = load_config(ROOT / args.config, args.overrides)
        arch, source = load_arch(cfg, ROOT / args.config, args.arch)
        assert Path(source).resolve() == arch_file(path).resolve()
        validate_run(cfg, arch)
        plans = plan_run(cfg, arch, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, negatives=args.negatives,
                         reserve_gib=args.reserve)
        for plan in plans:
            assert plan.fits, f"{argv[2:]}: stage {plan.stage} needs {plan.peak.total / GIB:.1f} GiB"
            assert plan.global_batch == STAGES[plan.stage]["global_batch"], (argv[2:], plan.stage)


@pytest.mark.parametrize("model,variant", RECIPES)
def test_data_build_commands_write_where_the_recipe_reads(model: str, variant: str):
    path = recipe_path(model, variant)
    built = {(ROOT / out).resolve() for out in re.findall(r"embedforge data build .*?--output (\S+)", comments(path))}
    read = {Path(s.data.path).resolve() for s in load_config(path).stages}
    assert read == built
    assert all(p.is_relative_to(ROOT / "data" / "llm2vec") for p in read)
