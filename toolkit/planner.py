"""Memory planner: per-GPU parameters, gradients, optimizer states and activations of a recipe.

Why: a 70B recipe that cannot fit should fail on a laptop in a second, not on 64 GPUs after the
weights loaded. The numbers describe megatron-core on GPUs (the engine used at scale) per pipeline
stage: the first holds the embedding and the most in-flight micro-batches, the last the final
norm, LM head, pooling head and MNTP logits; `parallel.first_stage_layers` / `last_stage_layers`
give those two fewer (or more) layers than the others (`ModelArgs.stage_layer_counts`). Assumptions, stated:

- Weights are stored in `model.dtype` (bf16: 2 bytes). With LoRA the base is frozen; the adapters
  (and a trainable pooling head) are fp32 with fp32 grads and Adam m, v: 4 + 4 + 8 = 16 bytes/param,
  replicated over DP (they are tiny). Full fine-tuning in bf16 counts the usual mixed-precision
  2 + 2 + 12 bytes/param (bf16 weights and grads, fp32 master + m + v), in fp32 4 + 4 + 8. With
  `distributed_optimizer` (megatron's ZeRO-1, `parallel.distributed_optimizer` or `--distributed-
  optimizer`; refused for an engine whose spec has none) the bytes are what that engine allocates
  (toolkit/engines/megatron/dist_optimizer.py), for every trainable tensor (adapters and heads too):
  weights in their dtype, an fp32 main-gradient buffer (4) plus the reduced owned range (4/dp), and
  fp32 master (bf16 weights only) + m + v over dp: bf16 2 + (4 + 4/dp) + 12/dp, fp32 4 + (4 + 4/dp) + 8/dp.
- The LM head is a frozen copy on the last stage (neither engine trains it; tied embeddings get their
  own frozen copy); vocabularies are padded to a multiple of tp; TP shards linears, not norms.
- Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models"), generalised from GPT-3 to GQA + SwiGLU; for GPT-3 shapes it reduces exactly
  to s*b*h*(34 + 5*a*s/h) bytes per layer (16-bit, dropout on), /t with TP + sequence parallel
  (only the TP-sharded part /t without it), selective recompute dropping the 5*a*s/h term (so do
  sdpa / flash kernels), full recompute keeping the layer input (2*s*b*h) plus one layer's working
  set. Terms: `layer_activation_bytes`; measured HF / megatron differences: tests/test_planner.py.
- 1F1B keeps min(pp - stage, micro-batches) micro-batches in flight. A contrastive micro-batch is
  all texts of a step (queries + positives + negatives, or both SimCSE views: their loss couples
  them) unless GradCache (`objective.gradcache_chunk_size`) embeds them in chunks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.assets import model_config_file
from toolkit.config import ConfigError, RunConfig, StageConfig
from toolkit.distributed.parallel_dims import ParallelDims
from toolkit.engines.spec import engine_spec, validate_run
from toolkit.models.arch import LORA_TARGETS, ModelArgs, read_model_args

GIB = 2**30


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How one layer runs: what the activation formula depends on besides the shapes."""

    tp: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"  # none | selective | full
    scores_materialized: bool = False  # unfused attention without recompute keeps the a*s*s scores
    kv_repeated: bool = False  # K / V kept query-wide (megatron's masked SDPA on GPU repeats them)
    act_bytes: int = 2  # 2 = bf16 activations, 4 = fp32
    full_ft: bool = False  # every weight trainable (its linear keeps its input for the weight grad)
    lora_targets: tuple[str, ...] = ()
    lora_r: int = 16
    lora_dropout: float = 0.0
    attention_dropout: float = 0.0


def pooling_params(mode: str, hidden: int, num_seeds: int = 1, num_latents: int = 512) -> int:
    """Trainable pooling-head parameters (toolkit.models.pooling), on the last stage, replicated."""
    if mode == "pma":  # seeds, q/k/v/ffn linears with bias, two LayerNorms
        return num_seeds * hidden + 4 * (hidden * hidden + hidden) + 4 * hidden
    if mode == "latent_attention":  # latents, q, kv, out (no bias), 2-layer MLP with bias
        return num_latents * hidden + 4 * hidden * hidden + 2 * (hidden * hidden + hidden)
    return 0


def layer_activation_bytes(arch: ModelArgs, lay: Layout, tokens: int, seq: int, *, stored: bool = True) -> dict[str, float]:
    """Bytes one layer keeps for backward for `tokens` (= s*b) tokens, by term.

    Korthikanti's GPT-3 count per layer (16-bit): norms 4sbh, QKV input 2sbh, Q K V 6sbh, attention
    output (projection input) 2sbh, MLP input 2sbh, GeLU input 8sbh and output 8sbh, two dropout
    masks 2sbh = 34sbh; scores: softmax 2as^2b, its dropout mask as^2b and output 2as^2b = 5as^2b.
    Generalised here: K and V are kv_heads wide (GQA) unless the scores are materialised (unfused
    attention repeats them to all heads); SwiGLU keeps gate, up and silu outputs (3F) plus the down
    projection input (F); a linear's input is kept only when its weight (or a dropout-free LoRA
    adapter on it) needs it, and a LoRA adapter with dropout keeps its own dropped copy + a 1-byte
    mask, plus A's r-wide output. Replicated-region tensors are /tp only with sequence parallel.
    `stored=False` gives the full layer even under full recompute (the recompute working set).
    """
    e, t = lay.act_bytes, lay.tp
    rep = t if lay.sequence_parallel else 1
    h, q, kv, f, a = arch.hidden_size, arch.dim("q"), arch.dim("kv"), arch.ffn_hidden_size, arch.num_heads
    if stored and lay.recompute == "full":
        return {"layer input": e * tokens * h / rep}

    def keeps_input(names: tuple[str, ...]) -> bool:
        return lay.full_ft or any(n in lay.lora_targets and lay.lora_dropout == 0 for n in names)

    scores = lay.scores_materialized and (lay.recompute == "none" or not stored)
    out = {"norms": 2 * e * tokens * h / rep}
    if keeps_input(("q_proj", "k_proj", "v_proj")):
        out["qkv input"] = e * tokens * h / rep
    kv_saved = q if scores or lay.kv_repeated else kv
    out["q, k, v, attention output"] = e * tokens * (2 * q + 2 * kv_saved) / t
    if scores:
        drop = (1 + e) if lay.attention_dropout > 0 else 0
        out["attention scores"] = a * seq * tokens * (e + drop) / t
    if keeps_input(("gate_proj", "up_proj")):
        out["mlp input"] = e * tokens * h / rep
    out["mlp activation"] = e * tokens * f * (3 if arch.gated else 1) / t
    if keeps_input(("down_proj",)):
        out["down input"] = e * tokens * f / t
    if arch.hidden_dropout > 0:
        out["dropout masks"] = 2 * tokens * h / rep
    lora = 0.0
    for name in lay.lora_targets:
        din, _, column = LORA_TARGETS[name]
        lora += e * tokens * lay.lora_r
        if lay.lora_dropout > 0:
            lora += (e + 1) * tokens * arch.dim(din) / (rep if column else t)
    if lora:
        out["lora"] = lora
    return out


@dataclass(kw_only=True)
class StageMemory:
    """One GPU of pipeline stage `pp_rank`; all sizes in bytes."""

    pp_rank: int
    layers: int
    params: int
    trainable: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    reserve: float
    activation_terms: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.reserve


@dataclass(kw_only=True)
class Plan:
    """The memory plan of one training stage on `gpus` GPUs of `gpu_mem_gib` GiB."""

    stage: str
    objective: str
    gpus: int
    gpu_mem_gib: float
    tp: int
    pp: int
    dp: int
    layout: Layout
    seq: int
    micro_texts: int
    num_micro: int
    global_batch: int
    texts_per_sample: int
    stages: list[StageMemory]
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.gpu_mem_gib * GIB


def check_parallel(cfg: RunConfig, arch: ModelArgs, gpus: int) -> tuple[int, int, int]:
    """(tp, pp, dp) for `gpus` GPUs after the engine's own checks, or the ConfigError the run would get."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    validate_run(cfg, arch)  # the engine's own refusals, shape checks of its TP x PP included
    dims = ParallelDims.from_config(cfg.parallel, gpus, 0)
    return dims.tp, dims.pp, dims.dp


def plan_stage(cfg: RunConfig, stage: StageConfig, arch: ModelArgs, *, gpus: int, gpu_mem_gib: float,
               negatives: int = 1, distributed_optimizer: bool = False, reserve_gib: float = 3.0) -> Plan:
    """Per-GPU memory of every pipeline stage for one training stage of `cfg`."""
    tp, pp, dp = check_parallel(cfg, arch, gpus)
    traits = engine_spec(cfg.engine).planner
    distributed_optimizer = distributed_optimizer or cfg.parallel.distributed_optimizer
    if distributed_optimizer and not traits.distributed_optimizer:
        raise ConfigError(f"--distributed-optimizer: engine={cfg.engine} has no distributed optimizer (optimizer "
                          "states are replicated over DP); plan without it")
    kind, lora = stage.objective.kind, stage.lora
    unknown = [t for t in lora.target_modules if t not in LORA_TARGETS] if lora.enabled else []
    if unknown:
        raise ConfigError(f"lora.target_modules: {unknown[0]!r} is not planned; known: {', '.join(LORA_TARGETS)}")
    recompute = cfg.parallel.recompute if traits.honours_recompute else "none"
    if cfg.model.gradient_checkpointing and recompute == "none":
        recompute = "full"  # what both engines do with it
    attn_drop = stage.attention_dropout if stage.attention_dropout is not None else (
        cfg.model.attention_dropout if cfg.model.attention_dropout is not None else arch.attention_dropout)
    lay = Layout(tp=tp, sequence_parallel=cfg.parallel.sequence_parallel, recompute=recompute,
                 scores_materialized=traits.scores_materialized or cfg.model.attn_implementation == "eager",
                 kv_repeated=traits.kv_repeated,
                 act_bytes=2 if stage.precision == "bf16" else 4, full_ft=not lora.enabled,
                 lora_targets=tuple(lora.target_modules) if lora.enabled else (), lora_r=lora.r,
                 lora_dropout=lora.dropout, attention_dropout=attn_drop)
    notes: list[str] = []
    # Texts per step and per micro-batch (what is alive at once).
    seq, batch = stage.data.max_length, stage.data.batch_size
    # a teacher stage's texts are its (query, candidate) prompts: the positive's and each negative's
    texts_per_sample = {"mntp": 1, "simcse": 2, "teacher": 1 + negatives}.get(kind, 2 + negatives)
    step_texts = batch * texts_per_sample
    chunk = stage.objective.gradcache_chunk_size
    if kind == "mntp":
        micro = min((cfg.parallel.micro_batch_size if traits.pipeline_micro_batches else 0) or batch, batch)
        num_micro = stage.grad_accum * math.ceil(batch / micro)
    elif chunk:
        micro = min(chunk, step_texts)
        num_micro = stage.grad_accum * math.ceil(step_texts / micro)
    else:
        micro, num_micro = step_texts, stage.grad_accum
        notes.append(f"{kind}: all {step_texts} texts of a step are one micro-batch (their loss couples them)")
    tokens = micro * seq

    # e.g. DeepSpeed's bf16 mode: bf16 weights (trainable ones too) and fp32 masters in the optimizer
    ds_bf16 = traits.bf16_keeps_bf16_weights and stage.precision == "bf16"
    wbytes = 2 if cfg.model.dtype == "bfloat16" or ds_bf16 else 4
    opt_bytes = (12 if wbytes == 2 else 8) / (dp if distributed_optimizer else 1)
    twbytes, tobytes = (2, 12.0) if ds_bf16 else (4, 8.0)  # a LoRA adapter's weight / optimizer bytes
    # an fp32 tensor's gradient and optimizer bytes (adapters, heads); ZeRO-1: main grad + owned range
    f32_grad, f32_opt = (4.0 + 4.0 / dp, 8.0 / dp) if distributed_optimizer else (4.0, 8.0)
    full_grad = (4.0 + 4.0 / dp) if distributed_optimizer else wbytes  # fp32 main grads, any weight dtype
    per_layer_params = arch.layer_params(tp)
    vocab_rows = arch.padded_vocab(tp) // tp
    head = pooling_params(cfg.pooling.mode, arch.hidden_size, cfg.pooling.num_seeds, cfg.pooling.num_latents)
    per_layer = layer_activation_bytes(arch, lay, tokens, seq)
    working = sum(layer_activation_bytes(arch, lay, tokens, seq, stored=False).values()) if recompute == "full" else 0.0
    stages, counts = [], arch.stage_layer_counts(pp, cfg.parallel.first_stage_layers, cfg.parallel.last_stage_layers)
    for p, n_layers in enumerate(counts):
        first, last = p == 0, p == pp - 1
        base = n_layers * per_layer_params + (vocab_rows * arch.hidden_size if first else 0)
        lm_head = vocab_rows * arch.hidden_size  # a frozen copy even when tied (toolkit.models.loading)
        frozen_head = (arch.hidden_size + lm_head) if last else 0  # final norm + LM head
        adapters = n_layers * arch.lora_params(lay.lora_targets, lora.r, tp) if lora.enabled else 0
        extra = head if last and kind != "teacher" else 0  # a teacher trains no pooling head
        if lora.enabled:
            trainable = adapters + extra
            weights = (base + frozen_head) * wbytes + trainable * twbytes
            grads, optim = (trainable * f32_grad, trainable * f32_opt) if distributed_optimizer else (
                trainable * 4.0, trainable * tobytes)
        else:
            full = base + (arch.hidden_size if last else 0)  # the final norm trains, the LM head stays frozen
            trainable = full + extra
            weights = (base + frozen_head) * wbytes + extra * 4
            grads, optim = full * full_grad + extra * f32_grad, full * opt_bytes + extra * f32_opt
        inflight = min(pp - p, num_micro)
        terms = {k: v * n_layers * inflight for k, v in per_layer.items()}
        if working:
            terms["recompute working set"] = working
        if traits.partition is not None:
            weights, grads, optim = traits.partition(cfg, dp, weights, grads, optim, notes)
        if traits.gathers_layer_weights and traits.gathers_layer_weights(cfg):  # gathered while it runs
            terms["zero-3 gathered layer"] = per_layer_params * wbytes
        if last:
            terms["final norm"] = lay.act_bytes * tokens * arch.hidden_size / (tp if lay.sequence_parallel else 1)
            if kind == "mntp":
                terms["mntp logits"] = stage.objective.mntp.mask_probability * tokens * vocab_rows * 4
        stages.append(StageMemory(pp_rank=p, layers=n_layers, params=base + frozen_head + adapters + extra,
                                  trainable=trainable, weights=weights, grads=grads, optimizer=optim,
                                  activations=sum(terms.values()), reserve=reserve_gib * GIB,
                                  activation_terms=terms))
    return Plan(stage=stage.name, objective=kind, gpus=gpus, gpu_mem_gib=gpu_mem_gib, tp=tp, pp=pp, dp=dp,
                layout=lay, seq=seq, micro_texts=micro, num_micro=num_micro,
                global_batch=batch * dp * stage.grad_accum, texts_per_sample=texts_per_sample, stages=stages,
                notes=notes)


def plan_run(cfg: RunConfig, arch: ModelArgs, *, gpus: int, gpu_mem_gib: float, stage: str | None = None,
             **kwargs) -> list[Plan]:
    """A plan per training stage of `cfg` (or only the one named `stage`)."""
    chosen = [s for s in cfg.stages if stage is None or s.name == stage]
    if not chosen:
        raise ConfigError(f"--stage {stage}: no such stage; stages are {[s.name for s in cfg.stages]}")
    return [plan_stage(cfg, s, arch, gpus=gpus, gpu_mem_gib=gpu_mem_gib, **kwargs) for s in chosen]


_ARCH_COMMENT = re.compile(r"^#\s*arch:\s*(\S+)", re.MULTILINE)


def load_arch(cfg: RunConfig, config_path: str | Path | None = None,
              arch_file: str | Path | None = None) -> tuple[ModelArgs, str]:
    """The architecture: `arch_file`, else the model's config.json (a folder, or an `asset:` / `.gguf`
    model once imported), else the recipe's `# arch: FILE` comment (relative to the recipe), so presets
    plan without downloading any weights."""
    path = Path(arch_file) if arch_file else model_config_file(cfg.model.path)
    if path is None and config_path and (m := _ARCH_COMMENT.search(Path(config_path).read_text())):
        path = Path(config_path).parent / m[1]
    if path is None:
        spec = cfg.model.path
        imported = " (an asset: or .gguf model has one once imported by `train` or `quickstart`)" \
            if spec.startswith("asset:") or spec.endswith(".gguf") else ""
        raise ConfigError(f"model.path={spec}: no config.json there{imported}; pass --arch FILE (an HF config.json)")
    if not path.is_file():
        raise ConfigError(f"{path}: architecture file not found")
    return read_model_args(path), str(path)


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def format_plan(plan: Plan) -> str:
    """A plain-text table: first and last pipeline stage side by side (they bound the others)."""
    lay, cap = plan.layout, plan.gpu_mem_gib * GIB
    cols = [plan.stages[0], plan.stages[-1]] if plan.pp > 1 else plan.stages
    names = ["stage 0 (first)", f"stage {plan.pp - 1} (last)"] if plan.pp > 1 else ["per GPU"]
    if plan.peak not in cols:  # uneven stages: a middle stage can be the largest
        cols, names = cols + [plan.peak], names + [f"stage {plan.peak.pp_rank} (peak)"]

    def fits(s: StageMemory) -> str:
        return f"yes (+{(cap - s.total) / GIB:.1f} GiB)" if s.total <= cap else f"NO (-{(s.total - cap) / GIB:.1f} GiB)"

    rows = [(label, [fn(s) for s in cols]) for label, fn in [
        ("parameters", lambda s: _count(s.params)), ("  trainable", lambda s: _count(s.trainable)),
        ("weights", lambda s: _gib(s.weights)), ("gradients", lambda s: _gib(s.grads)),
        ("optimizer states", lambda s: _gib(s.optimizer)), ("activations", lambda s: _gib(s.activations)),
        ("reserve (context, NCCL, frag.)", lambda s: _gib(s.reserve)), ("total", lambda s: _gib(s.total)),
        (f"fits in {plan.gpu_mem_gib:g} GiB", fits)]]
    width, colw = max(len(r[0]) for r in rows) + 2, max(18, *(len(v) + 2 for _, vals in rows for v in vals))
    lines = [
        f"stage {plan.stage} ({plan.objective}): {plan.gpus} GPUs = tp {plan.tp} x pp {plan.pp} x dp {plan.dp}; "
        f"recompute {lay.recompute}; sequence parallel {'on' if lay.sequence_parallel else 'off'}; "
        f"{'bf16' if lay.act_bytes == 2 else 'fp32'} activations",
        f"  global batch {plan.global_batch} samples x {plan.texts_per_sample} text(s) x {plan.seq} tokens; "
        f"micro-batch {plan.micro_texts} texts, {plan.num_micro} per step per DP rank, "
        f"{min(plan.pp, plan.num_micro)} in flight on stage 0",
        "".ljust(width) + "".join(n.rjust(colw) for n in names),
    ] + [label.ljust(width) + "".join(v.rjust(colw) for v in vals) for label, vals in rows]
    top = sorted(plan.stages[0].activation_terms.items(), key=lambda kv: -kv[1])[:4]
    lines.append("  stage 0 activations: " + ", ".join(f"{k} {_gib(v)}" for k, v in top))
    return "\n".join(lines + [f"  note: {n}" for n in plan.notes])
