"""LoRA through peft: add an adapter to the backbone, merge it back (stage chaining, export)."""

from __future__ import annotations

from torch import nn

from toolkit.config import ConfigError, LoraConfig


def linear_module_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap `model` with a fresh trainable adapter; the base weights are frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    available = linear_module_names(model)
    missing = [t for t in cfg.target_modules if t not in available]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} not found in the model; linear layers are {available}")
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules))
    return get_peft_model(model, peft_cfg)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold adapters into the base weights and return the plain model (no-op without adapters)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
