"""Bidirectional attention for decoder-only HF models through a config flag (LLM2Vec step 1).

Mechanism (transformers 5.23): `config.is_causal = False`. `create_causal_mask` /
`create_sliding_window_causal_mask` then build padding-only (bidirectional) masks, and the
`merge_with_config_defaults` decorator on every supported base model forwards `is_causal=False`
to the attention kernels, so sdpa/flash never fall back to their own causal flag when the mask is
skipped (no padding, e.g. batch size 1: the reference code's silent-causal bug). The flag is a
plain config attribute, so `save_pretrained` writes it to config.json and a bare
`AutoModel.from_pretrained` (hence sentence-transformers) reloads the model bidirectional.

Not used on purpose: the attention modules' `is_causal` attribute (padding masks stay causal) and
Gemma/Gemma2's `use_bidirectional_attention` (it only flips that attribute; their masks ignore it).
Gemma3's own flag does reach its masks; a config that already has it on is left as it is, so its
trained symmetric sliding window (exclusive bound) is kept.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from toolkit.errors import EmbedforgeError

# Each family here is proven by tests/test_bidirectional.py (causal control, padding, eager vs
# sdpa, save/reload, peft + gradient checkpointing). Add a family only with its test.
SUPPORTED_FAMILIES: frozenset[str] = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"}
)

# Families whose own config flag already makes every mask bidirectional (see module docstring).
_NATIVE_FLAG = {"gemma3_text": "use_bidirectional_attention"}


class UnsupportedFamilyError(EmbedforgeError, ValueError):
    """Raised instead of silently leaving a model causal."""

    def __init__(self, model_type: str | None, path: str | None = None):
        where = f" ({path})" if path else ""
        super().__init__(
            f"bidirectional attention is not supported for model_type={model_type!r}{where}; "
            f"supported: {', '.join(sorted(SUPPORTED_FAMILIES))}. Use bidirectional=False to keep it causal, "
            "or add the family with a test in tests/test_bidirectional.py."
        )
        self.model_type = model_type
        self.path = path


def _unwrap(model_or_config):
    """The underlying transformers model of a peft wrapper (or the object itself)."""
    get_base = getattr(model_or_config, "get_base_model", None)
    return get_base() if callable(get_base) else model_or_config


def _config_of(model_or_config) -> PretrainedConfig:
    obj = _unwrap(model_or_config)
    if isinstance(obj, PretrainedConfig):
        return obj
    config = getattr(obj, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"expected a PreTrainedModel, a peft model or a PretrainedConfig, got {type(obj).__name__}")
    return config


def _path_of(model_or_config, config: PretrainedConfig) -> str | None:
    path = getattr(config, "_name_or_path", None) or getattr(_unwrap(model_or_config), "name_or_path", None)
    return str(path) if path else None


def _supported_config(model_or_config) -> PretrainedConfig:
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        # Composite (multimodal) configs such as "gemma3" build their own masks: not proven, refused.
        raise UnsupportedFamilyError(model_type, _path_of(model_or_config, config))
    return config


def is_bidirectional(model_or_config) -> bool:
    """True when the config of a supported family asks for bidirectional attention."""
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        return False
    if getattr(config, "is_causal", True) is False:
        return True
    flag = _NATIVE_FLAG.get(model_type)
    return bool(flag and getattr(config, flag, False))


def make_bidirectional(model_or_config):
    """Set the config flag that turns causal masks into padding-only masks; returns the same object.

    Works on a config before loading (no weights touched) or on a loaded / peft-wrapped model: the
    model's modules share its config object and read the flag at every forward.
    """
    config = _supported_config(model_or_config)
    if not is_bidirectional(config):
        config.is_causal = False
    return model_or_config


def _default_probe(config: PretrainedConfig) -> torch.Tensor:
    vocab = int(getattr(config.get_text_config(), "vocab_size", 0) or 0)
    if vocab < 2:
        raise RuntimeError("check_bidirectional: cannot build probe tokens without config.vocab_size >= 2")
    return (torch.arange(8) + 3) % vocab


@torch.no_grad()
def _last_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    hidden = getattr(out, "last_hidden_state", None)
    return (hidden if hidden is not None else out.hidden_states[-1]).float()


def check_bidirectional(model, input_ids: torch.Tensor | None = None) -> None:
    """Runtime proof, not trust in flags: change the LAST token and require position 0 to change.

    Runs batch size 1 without padding (the path where the reference code silently went causal),
    in eval mode (dropout off; the previous mode is restored). Raises RuntimeError if still causal.
    The default probe is 8 tokens: pass shorter `input_ids` for a model with a smaller sliding window.
    """
    base = _unwrap(model)
    config = _config_of(base)
    ids = _default_probe(config) if input_ids is None else torch.as_tensor(input_ids)
    ids = ids.reshape(-1, ids.shape[-1])[:1].long()
    if ids.shape[1] < 2:
        raise ValueError("check_bidirectional: input_ids needs at least 2 tokens")
    vocab = int(getattr(config.get_text_config(), "vocab_size", 0) or 0) or int(ids.max()) + 2
    device = next(base.parameters()).device
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % vocab
    was_training = base.training
    base.eval()
    try:
        a, b = _last_hidden(base, ids.to(device)), _last_hidden(base, changed.to(device))
    finally:
        base.train(was_training)
    first = (a[0, 0] - b[0, 0]).abs().max().item()
    last = (a[0, -1] - b[0, -1]).abs().max().item()
    if last == 0.0 or first <= 1e-4 * last:
        raise RuntimeError(
            f"model is still causal: changing the last token changed position 0 by {first:.3g} "
            f"(the last position by {last:.3g}); model_type={getattr(config, 'model_type', None)!r}, "
            f"attn_implementation={getattr(config, '_attn_implementation', None)!r}, "
            f"config.is_causal={getattr(config, 'is_causal', 'unset')!r}, bidirectional flag set: "
            f"{is_bidirectional(config)}. Call make_bidirectional() before use, on the model's own config."
        )
