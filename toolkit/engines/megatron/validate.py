"""Every recipe the megatron engine refuses, checked before any weight is read.

The engine spec's `validate`: run by `embedforge train | plan | submit` as a pre-flight and again by
the engine as soon as it has read the model's config, so the refusal and its message are the same
wherever a recipe fails.
"""

from __future__ import annotations

from toolkit.config import ConfigError, RunConfig
from toolkit.models.arch import LORA_TARGETS, ModelArgs

ROPE_TYPES = ("default", "llama3")
# megatron-core's llama3 rope scaling has these fixed; other values would silently move positions
MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def validate(cfg: RunConfig, args: ModelArgs | None) -> None:
    teacher = all(stage.objective.kind == "teacher" for stage in cfg.stages)  # causal masks, given per batch
    if not cfg.model.bidirectional and not teacher:
        raise ConfigError("engine=megatron: model.bidirectional=false is supported only for a teacher recipe "
                          "(objective.kind=teacher); an encoder here is bidirectional")
    for index, stage in enumerate(cfg.stages):
        where = f"stages[{index}] ({stage.name})"
        if stage.objective.kind == "teacher" and stage.data.pack:
            raise ConfigError(f"{where}.data.pack=true: engine=megatron does not pack a teacher stage's causal "
                              "prompts; set data.pack=false")
        if stage.objective.kind == "mntp" and stage.objective.mntp.mask_token == "new":
            raise ConfigError(f"{where}: engine=megatron: mntp.mask_token=new (resizing the vocabulary) is not "
                              "supported; use mask_token: auto, underscore, eos or tokenizer")
        if not stage.lora.enabled and cfg.model.dtype == "bfloat16" and not cfg.parallel.distributed_optimizer:
            raise ConfigError(f"{where}.lora.enabled=false with model.dtype=bfloat16: full fine-tuning needs fp32 "
                              "master weights, which engine=megatron keeps only with parallel.distributed_optimizer="
                              "true; set it, or use model.dtype=float32 with precision: bf16 (autocast), or LoRA")
        unknown = [t for t in stage.lora.target_modules if t not in LORA_TARGETS] if stage.lora.enabled else []
        if unknown:
            raise ConfigError(f"{where}.lora.target_modules: {unknown} are not LoRA targets of engine=megatron; "
                              f"choose from {sorted(LORA_TARGETS)}")
    if args is not None:
        validate_model(cfg, args)


def validate_model(cfg: RunConfig, args: ModelArgs) -> None:
    """What the megatron layer spec builds (`validate_architecture`), and a TP x PP split of these
    shapes (even or uneven stages)."""
    validate_architecture(args, cfg.model.max_length)
    par = cfg.parallel
    args.check_parallel(par.tp, par.pp, par.first_stage_layers, par.last_stage_layers)


def validate_architecture(args: ModelArgs, max_length: int) -> None:
    """No other biases than Qwen2's q/k/v, default or llama3 rope, full (not windowed) attention over
    `max_length` tokens (0: not checked)."""
    if args.mlp_bias or (args.attention_bias and args.model_type != "qwen2"):
        raise ConfigError(f"engine=megatron: model_type={args.model_type!r} with attention_bias / mlp_bias: biases "
                          "other than Qwen2's q/k/v bias are not supported")
    if args.rope_type not in ROPE_TYPES:
        raise ConfigError(f"engine=megatron: rope_type={args.rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
    rope = args.rope_scaling or {}
    off = {k: rope[k] for k, v in MEGATRON_LLAMA3.items() if args.rope_type == "llama3" and k in rope and rope[k] != v}
    if off:
        raise ConfigError(f"engine=megatron: llama3 rope scaling with {off} differs from megatron-core's fixed "
                          f"{MEGATRON_LLAMA3}; the positions would silently differ from the HF model")
    if args.sliding_window and args.sliding_window < max_length:
        raise ConfigError(f"engine=megatron: sliding_window={args.sliding_window} < model.max_length="
                          f"{max_length}; lower model.max_length (attention here is full, not windowed)")
