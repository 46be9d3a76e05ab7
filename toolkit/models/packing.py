"""Sequence packing for the HF backbone: a padded batch's texts run as a few rows of back-to-back
tokens, attention kept within each text, and the hidden states come back in the padded layout.

Padding costs every pad token a full pass through the layers; packing removes them (a batch of
mixed lengths pads to its longest). Only the backbone's forward sees the packed rows: pooling and
the losses read the unpacked, padded-layout hidden states, so their masks (instruction tokens,
MNTP labels, pad positions) are untouched and packed == padded up to floating-point rounding.

Attention within each text:
- sdpa: a boolean block-diagonal mask [rows, 1, T, T] (the kernel masks it; the math is T^2 per row);
- eager: the same as an additive float mask;
- flash_attention_2 / 3: no mask, `position_ids` restarting at 0 per text, from which transformers
  derives `cu_seqlens` for flash-attn's varlen kernel (non-causal: the config's is_causal=False);
  transformers reads packing only from a single flattened row, so all texts go into one row.
RoPE sees positions restarting at 0 per text; the padded path (right padding) uses the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from data_pipelines.batching import first_fit

VARLEN_IMPLEMENTATIONS = frozenset({"flash_attention_2", "flash_attention_3"})


@dataclass(frozen=True)
class PackedBatch:
    input_ids: Tensor  # [rows, T]
    position_ids: Tensor  # [rows, T], restarting at 0 per text
    segments: Tensor  # [rows, T]: the text each slot holds; a free slot at a row's end has its own id
    source: Tensor  # [tokens]: flat index into the [rows * T] packed slots of each real token ...
    target: Tensor  # [tokens]: ... and its flat index into the padded [b * s] layout
    padded_shape: tuple[int, int]  # (b, s)

    def block_mask(self) -> Tensor:
        """[rows, 1, T, T], True where query and key slot hold the same text."""
        return self.segments[:, None, :, None] == self.segments[:, None, None, :]

    def attention_mask(self, attn_implementation: str, dtype: torch.dtype) -> Tensor | None:
        """The HF backbone's `attention_mask` argument for this packing (see the module docstring)."""
        if attn_implementation in VARLEN_IMPLEMENTATIONS:
            return None
        same = self.block_mask()
        if attn_implementation == "sdpa":
            return same
        return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill_(~same, torch.finfo(dtype).min)

    def unpack(self, hidden: Tensor) -> Tensor:
        """Packed hidden states [rows, T, h] -> the padded layout [b, s, h] (zeros at pad positions)."""
        b, s = self.padded_shape
        flat = hidden.reshape(-1, hidden.shape[-1])
        out = flat.new_zeros(b * s, hidden.shape[-1])
        return out.index_copy(0, self.target, flat.index_select(0, self.source)).view(b, s, -1)


def pack_batch(input_ids: Tensor, attention_mask: Tensor, max_tokens: int, multiple: int = 1) -> PackedBatch:
    """Pack the texts of a padded batch (`attention_mask` 1 = token) into rows of at most
    `max_tokens` slots (first fit, in batch order), the row width rounded up to `multiple`
    (sequence parallelism splits it over TP ranks); a text longer than `max_tokens` is refused."""
    b, s = input_ids.shape
    keep = attention_mask.bool().cpu()  # the layout is planned on the CPU: one transfer in, one out
    lengths = keep.sum(dim=1).tolist()
    if max(lengths, default=0) > max_tokens:
        raise ValueError(f"a text of {max(lengths)} tokens does not fit a packed row of {max_tokens}")
    rows = first_fit(lengths, max_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    width += -width % multiple
    tokens = keep.reshape(-1).nonzero().squeeze(1)  # flat padded-layout index of every real token, text by text
    first = [0]
    for n in lengths:
        first.append(first[-1] + n)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    seg = torch.arange(b, b + width).repeat(len(rows), 1)  # free slots: ids >= b, each its own
    sources, targets = [], []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            pos[r, start : start + n] = torch.arange(n)
            seg[r, start : start + n] = i
            sources.append(torch.arange(r * width + start, r * width + start + n))
            targets.append(tokens[first[i] : first[i] + n])
            start += n
    device = input_ids.device
    source, target = torch.cat(sources).to(device), torch.cat(targets).to(device)
    ids = torch.zeros(len(rows) * width, dtype=input_ids.dtype, device=device)
    ids[source] = input_ids.reshape(-1)[target]
    return PackedBatch(ids.view(len(rows), width), pos.to(device), seg.to(device), source, target, (b, s))


def pack_for_backbone(input_ids: Tensor, attention_mask: Tensor, attn_implementation: str) -> PackedBatch:
    """The HF backbone's packing: rows as wide as the padded batch (a block-diagonal mask), or one
    flattened row for the varlen kernels."""
    if attn_implementation in VARLEN_IMPLEMENTATIONS:
        return pack_batch(input_ids, attention_mask, max_tokens=max(int(attention_mask.sum()), 1))
    return pack_batch(input_ids, attention_mask, max_tokens=input_ids.shape[1])
