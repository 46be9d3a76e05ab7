"""Forward-only megatron stages at TP x PP for inference: teacher scoring and encoding of models that
do not fit one device or one process.

Each rank builds only its own stage (`build_backbone`) and reads only its slices of the HF weights
(`HFWeights` + `hf_to_megatron`), as the training engine does. Batches run through megatron's
pipeline schedule, forward only, all micro-batches in one schedule (the stages overlap); the last
stage reduces each micro-batch's final-norm hidden states to what the caller needs (a last-token
row, pooled embeddings), and `broadcast` gives those results to every rank of the model-parallel
group, so each rank can go on with the same values (only one of them writes).

The attention mask is the caller's (True = masked): causal and key-padding for a teacher,
key-padding only (bidirectional) for an encoder. megatron's RoPE numbers slots 0..s-1; attention
depends on relative positions only, so a left-padded row scores as HF's positions would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from toolkit.distributed.parallel_dims import ParallelDims
from toolkit.engines.megatron.convert import hf_to_megatron
from toolkit.engines.megatron.model import build_backbone, transformer_config, vocab_rows
from toolkit.engines.megatron.validate import validate_architecture
from toolkit.engines.megatron.weights import HFWeights
from toolkit.models.arch import ModelArgs


def load_stage_weights(model: torch.nn.Module, hf, arch: ModelArgs, dims: ParallelDims, *, include_head: bool,
                       source: str, first_stage_layers: int = 0, last_stage_layers: int = 0) -> None:
    """This rank's slices of the HF weights `hf` into its stage `model`, every expected tensor checked."""
    state = hf_to_megatron(hf, arch, tp=dims.tp, tp_rank=dims.tp_rank, pp=dims.pp, pp_rank=dims.pp_rank,
                           include_head=include_head, source=source, first_stage_layers=first_stage_layers,
                           last_stage_layers=last_stage_layers)
    own = model.state_dict()
    skip = ("_extra_state",) if include_head else ("_extra_state", "output_layer.weight")
    missing = sorted(k for k in own if k not in state and not k.endswith(skip))
    if missing:
        raise KeyError(f"megatron model expects tensors the conversion did not produce: {missing[:4]}")
    for name, value in state.items():
        if own[name].shape != value.shape:
            raise ValueError(f"{name}: converted shape {tuple(value.shape)} != model shape {tuple(own[name].shape)}")
    model.load_state_dict(state, strict=False)


class MegatronForward:
    """This rank's pipeline stage of an HF decoder (`path`) at the TP x PP of `dims`, forward only."""

    def __init__(self, path: Path, dims: ParallelDims, *, dtype: torch.dtype = torch.float32,
                 include_head: bool = False, max_length: int = 0, seed: int = 0, weights_prefix: str = ""):
        """`weights_prefix`: "model." for a base-model folder (an encoder's), whose tensors are named
        without the causal LM's prefix; `include_head` loads the LM head on the last stage."""
        from transformers import AutoConfig

        self.dims = dims
        self.arch = ModelArgs.from_hf_config(AutoConfig.from_pretrained(path), source=str(path / "config.json"))
        validate_architecture(self.arch, max_length)
        self.arch.check_parallel(dims.tp, dims.pp)
        dims.initialize_megatron(seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        config = transformer_config(self.arch, tp=dims.tp, pp=dims.pp, dtype=dtype)
        self.model = build_backbone(self.arch, config, pre_process=dims.is_first_stage, post_process=dims.is_last_stage,
                                    pp_rank=dims.pp_rank).to(self.device).eval()
        with HFWeights(path, prefix=weights_prefix) as weights:  # one open per file, this rank's slices only
            load_stage_weights(self.model, weights, self.arch, dims, include_head=include_head, source=str(path))

    def head_rows(self, token_ids: list[int]) -> Tensor | None:
        """Rows of the (vocabulary-parallel) LM head for `token_ids` [n, h] on the last stage, summed
        over TP from the rank that holds each row; None on other stages."""
        if not self.dims.is_last_stage:
            return None
        return vocab_rows(self.model.output_layer.weight, token_ids, tp_rank=self.dims.tp_rank,
                          tp_group=self.dims.tp_group if self.dims.tp > 1 else None)

    @torch.no_grad()
    def run(self, batches: list[tuple[Tensor, Tensor]], reduce: Callable[[Tensor, int], Tensor]) -> list[Tensor] | None:
        """`batches` of (input ids [b, s], megatron mask, True = masked) through the pipeline; on the
        last stage, `reduce(hidden [b, s, h], index)` of each, in order; None on other stages."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            index, ids, mask = next(data_iterator)
            ids = ids.to(self.device)
            positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0).expand_as(ids)
            output = model(ids if self.dims.is_first_stage else None, positions, mask.to(self.device))

            def collect(output_tensor: Tensor, non_loss_data: bool = True):
                return reduce(output_tensor.transpose(0, 1), index)

            return output, collect

        if not batches:
            return [] if self.dims.is_last_stage else None
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([(i, ids, m) for i, (ids, m) in enumerate(batches)]),
            model=self.model, num_microbatches=len(batches), seq_length=max(ids.shape[1] for ids, _ in batches),
            micro_batch_size=batches[0][0].shape[0], forward_only=True, collect_non_loss_data=True)
        return list(out) if self.dims.is_last_stage else None

    def broadcast(self, results: list[Tensor] | None, shapes: list[tuple[int, ...]]) -> list[Tensor]:
        """The last stage's (TP rank 0's) float32 `results` on every rank of this model-parallel group."""
        d = self.dims
        if d.tp * d.pp == 1:
            return results
        sizes = [math.prod(s) for s in shapes]
        flat = torch.empty(sum(sizes), dtype=torch.float32)
        if d.is_group_writer:
            flat = torch.cat([r.detach().float().cpu().reshape(-1) for r in results]) if results else flat
        dist.broadcast(flat, src=d.group_writer_rank, group=d.group("mp"))
        return [t.view(s) for t, s in zip(torch.split(flat, sizes), shapes)]
