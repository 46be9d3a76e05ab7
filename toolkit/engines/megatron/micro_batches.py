"""The megatron engine's micro-batches: what one pipeline-schedule slot carries.

A micro-batch is a dict of right-padded token tensors ([n, s]: input_ids, attention_mask, and
labels for MNTP, embed_mask for the contrastive roles, or a teacher stage's prompts with `causal`
set and each row's last real position) plus its loss scale; the sequence length
is padded to a multiple of TP under sequence parallelism, and with `data.pack` it carries the
packed rows the model runs (`packed`, models/packing.py) while the loss reads the padded layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from toolkit.engines.megatron.model import causal_padding_mask, padding_mask
from toolkit.models.packing import pack_batch
from toolkit.objectives.mntp import IGNORE_INDEX


def finish(mb: dict, *, multiple: int, pack: bool) -> dict:
    """Pad the sequence length to `multiple` and, with `pack`, add the packed rows."""
    mb = pad_to_multiple(mb, multiple)
    if pack:
        mb["packed"] = pack_batch(mb["input_ids"], mb["attention_mask"], mb["input_ids"].shape[1], multiple=multiple)
    return mb


def model_ids(mb: dict) -> Tensor:
    """The token ids the model runs: the packed rows, or the padded batch."""
    return mb["packed"].input_ids if "packed" in mb else mb["input_ids"]


def attention_mask(mb: dict) -> Tensor:
    """megatron's mask for `model_ids(mb)`, True where masked: other texts' slots when packed
    ([rows, 1, T, T]), later positions and pad keys for a causal (teacher) micro-batch ([b, 1, s, s]),
    pad keys otherwise ([b, 1, 1, s])."""
    if "packed" in mb:
        return ~mb["packed"].block_mask()
    if mb.get("causal"):
        return causal_padding_mask(mb["attention_mask"])
    return padding_mask(mb["attention_mask"])


def mntp_chunks(batch: dict, *, size: int, scale: float) -> list[dict]:
    """An MNTP batch cut into micro-batches of `size` texts, each carrying the step's loss scale."""
    return [{**{k: v[i : i + size] for k, v in batch.items()}, "scale": scale}
            for i in range(0, batch["input_ids"].shape[0], size)]


def pad_to_multiple(mb: dict, multiple: int) -> dict:
    """Right-pad a micro-batch's token tensors so the sequence length divides by `multiple`."""
    length = mb["input_ids"].shape[1]
    extra = -length % multiple
    if not extra:
        return mb
    fill = {"labels": IGNORE_INDEX}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill.get(k, 0)) if k in TOKEN_TENSORS else v
            for k, v in mb.items()}


TOKEN_TENSORS = ("input_ids", "attention_mask", "labels", "embed_mask")  # [n, s]: padded with the sequence


def concat_groups(groups: list[dict]) -> dict:
    """Role groups (each [n_g, s_g]) as one right-padded micro-batch [sum n_g, max s_g] + group sizes."""
    longest = max(g["input_ids"].shape[1] for g in groups)

    def pad(t: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(t, (0, longest - t.shape[1]), value=value)

    return {
        "input_ids": torch.cat([pad(g["input_ids"], 0) for g in groups]),
        "attention_mask": torch.cat([pad(g["attention_mask"], 0) for g in groups]),
        "embed_mask": torch.cat([pad(g["embed_mask"], 0) for g in groups]),
        "sizes": [g["input_ids"].shape[0] for g in groups],
    }
