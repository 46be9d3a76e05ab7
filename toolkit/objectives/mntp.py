"""MNTP (LLM2Vec 1.2): mask tokens, recover token i from the logits at position i-1.

Keeping the causal-LM shift aligns the objective with how the decoder was pretrained. Labels are
stored unshifted (the original id at the masked position); `mntp_loss` applies the shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.config import ConfigError

IGNORE_INDEX = -100
NEW_MASK_TOKEN = "<mask>"
_ALTERNATIVES = "set mntp.mask_token to 'underscore', 'eos' or 'new' (adds <mask> and resizes embeddings)"


@dataclass(kw_only=True)
class MaskingSpec:
    """bert = of the masked tokens 80% mask token / 10% random token / 10% unchanged; all_mask = 100% mask."""

    probability: float
    strategy: Literal["bert", "all_mask"]
    mask_token_id: int
    vocab_size: int
    special_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"MaskingSpec.probability must be in [0, 1], got {self.probability}")
        if self.strategy not in ("bert", "all_mask"):
            raise ValueError(f"MaskingSpec.strategy must be 'bert' or 'all_mask', got {self.strategy!r}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"MaskingSpec.mask_token_id {self.mask_token_id} is outside the vocabulary ({self.vocab_size})")


def resolve_mask_token(tokenizer, choice: Literal["auto", "tokenizer", "underscore", "eos", "new"]) -> tuple[int, bool]:
    """(mask id, whether a token was added); after `new` the caller must resize the embeddings.
    `auto` works for every tokenizer with an EOS (METHODS.md 1.2): its own mask token, else `_`, else EOS."""
    if choice == "auto":
        for fallback in ("tokenizer", "underscore", "eos"):
            try:
                return resolve_mask_token(tokenizer, fallback)
            except ConfigError:
                continue
        raise ConfigError("mntp.mask_token=auto: this tokenizer has no mask token, no single-token '_' and no EOS; "
                          "use mask_token: new")
    if choice == "tokenizer":
        if tokenizer.mask_token_id is None:
            raise ConfigError(f"mntp.mask_token=tokenizer: this tokenizer has no mask token; {_ALTERNATIVES}")
        return tokenizer.mask_token_id, False
    if choice == "underscore":
        vocab = tokenizer.get_vocab()
        if "_" in vocab:  # what the reference does (convert_tokens_to_ids("_"))
            return vocab["_"], False
        ids = tokenizer.encode("_", add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ConfigError(f"mntp.mask_token=underscore: '_' is not a single token here ({ids}); "
                              "use 'eos' or 'new'")
        return ids[0], False
    if choice == "eos":
        if tokenizer.eos_token_id is None:
            raise ConfigError("mntp.mask_token=eos: this tokenizer has no EOS token; use 'underscore' or 'new'")
        return tokenizer.eos_token_id, False
    if choice == "new":
        if NEW_MASK_TOKEN in tokenizer.get_vocab():
            return tokenizer.convert_tokens_to_ids(NEW_MASK_TOKEN), False
        if tokenizer.mask_token is None:
            tokenizer.add_special_tokens({"mask_token": NEW_MASK_TOKEN})
        else:  # keep the tokenizer's own mask token registered; ours is just an extra special token
            tokenizer.add_tokens([NEW_MASK_TOKEN], special_tokens=True)
        return tokenizer.convert_tokens_to_ids(NEW_MASK_TOKEN), True
    raise ConfigError(f"mntp.mask_token must be auto, tokenizer, underscore, eos or new; got {choice!r}")


def mask_for_mntp(input_ids: Tensor, attention_mask: Tensor, spec: MaskingSpec,
                  generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(masked input ids, unshifted labels). Eligible: real, non-special, and preceded by a real token.

    Position i is predicted from position i-1, so the first real token of a row (left or right padding)
    can never be a target. Random draws have fixed shapes, so the result depends only on the generator.
    """
    real = attention_mask.bool()
    prev_real = torch.zeros_like(real)
    prev_real[:, 1:] = real[:, :-1]
    eligible = real & prev_real
    if spec.special_ids:
        special = torch.tensor(sorted(spec.special_ids), dtype=input_ids.dtype, device=input_ids.device)
        eligible &= ~torch.isin(input_ids, special)

    def rand(shape) -> Tensor:
        return torch.rand(shape, generator=generator, device=generator.device).to(input_ids.device)

    masked = eligible & (rand(input_ids.shape) < spec.probability)
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    if spec.strategy == "all_mask":
        return input_ids.masked_fill(masked, spec.mask_token_id), labels

    kind = rand(input_ids.shape)  # < 0.8 mask token, < 0.9 random token, else unchanged
    # Random replacements are ordinary tokens: never a special id or the mask token itself.
    excluded = torch.tensor(sorted(spec.special_ids | {spec.mask_token_id}), dtype=torch.long)
    pool = torch.arange(spec.vocab_size)
    pool = pool[~torch.isin(pool, excluded)]
    picks = torch.randint(len(pool), input_ids.shape, generator=generator, device=generator.device)
    random_ids = pool.to(picks.device)[picks].to(device=input_ids.device, dtype=input_ids.dtype)
    out = torch.where(masked & (kind < 0.8), torch.full_like(input_ids, spec.mask_token_id), input_ids)
    out = torch.where(masked & (kind >= 0.8) & (kind < 0.9), random_ids, out)
    return out, labels


def mntp_loss(hidden_states: Tensor, lm_head: nn.Module, labels: Tensor) -> Tensor:
    """Mean CE of labels[:, i] given lm_head(hidden[:, i-1]), with logits only at target rows.

    Never materialises the [b, s, V] logits: at p=0.2 that is 5x less lm_head compute and memory.
    """
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    rows = hidden_states[:, :-1][selected]  # [t, d]
    logits = lm_head(rows)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if rows.shape[0] == 0:  # a zero that still reaches the backbone and lm_head (DDP sees every param)
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets[selected])
