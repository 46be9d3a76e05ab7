"""LoRA on megatron-core's tensor-parallel linears, with peft's parameterisation and arithmetic.

Adapters are named and shaped as peft's on the HF model (one (A, B) pair per HF projection, so
LoRA on q, k and v is three adapters, not one on the fused QKV), which makes a megatron LoRA run
comparable with the hf engine's and lets adapters move between engines. They attach through forward
hooks, so the backbone's parameter names (conversion, dist_checkpointing) never change.

Tensor parallelism:
- column-parallel base (fused QKV, fused gate|up): A [r, in] is replicated, B holds this rank's
  output rows; the A-output goes through `copy_to_tensor_model_parallel_region` (identity forward,
  all-reduce backward) so A's gradient sums every rank's rows, like the full matrix's would;
- row-parallel base (attention output, down projection): A holds this rank's input columns, the
  partial A-outputs are all-reduced (`reduce_from_tensor_model_parallel_region`), B is replicated.
With sequence parallelism the column input is gathered from the sequence slices first and the row
output reduce-scattered back to them; the replicated halves' gradients are then summed over TP by the
engine, like the norms'. Merging folds scaling * B @ A into the local weight shard (no communication).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from toolkit.config import LoraConfig
from toolkit.models.arch import LORA_TARGETS, ModelArgs

# HF projection -> (megatron module under a layer, parallel kind, piece of the fused output)
TARGETS = {
    "q_proj": ("self_attention.linear_qkv", "column", "q"),
    "k_proj": ("self_attention.linear_qkv", "column", "k"),
    "v_proj": ("self_attention.linear_qkv", "column", "v"),
    "o_proj": ("self_attention.linear_proj", "row", None),
    "gate_proj": ("mlp.linear_fc1", "column", "gate"),
    "up_proj": ("mlp.linear_fc1", "column", "up"),
    "down_proj": ("mlp.linear_fc2", "row", None),
}
assert set(TARGETS) == set(LORA_TARGETS), "every LoRA target of toolkit.models.arch has a megatron module"
HF_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class MegatronLora(nn.Module):
    """All adapters of one pipeline stage: `adapters["<local layer>-<hf target>"]` holds lora_A / lora_B."""

    def __init__(self, model, arch: ModelArgs, cfg: LoraConfig, *, tp: int, tp_rank: int, pp_rank: int, seed: int,
                 sequence_parallel: bool = False):
        super().__init__()
        self.arch, self.tp, self.tp_rank, self.pp_rank = arch, tp, tp_rank, pp_rank
        self.sequence_parallel = sequence_parallel
        self.scaling = cfg.alpha / cfg.r
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.adapters = nn.ModuleDict()
        self._hooks = []
        layers = model.decoder.layers
        self.layer_offset = layers[0].layer_number - 1 if len(layers) else 0  # megatron's (uneven stages too)
        for local, layer in enumerate(layers):
            global_layer = self.layer_offset + local
            by_module: dict[str, list[str]] = {}
            for target in cfg.target_modules:
                by_module.setdefault(TARGETS[target][0], []).append(target)
            for module_path, targets in by_module.items():
                linear = layer.get_submodule(module_path)
                for target in targets:
                    self.adapters[f"{local}-{target}"] = self._new_adapter(target, cfg.r, seed, global_layer)
                self._hooks.append(linear.register_forward_hook(self._hook(local, module_path, targets)))

    def _new_adapter(self, target: str, r: int, seed: int, global_layer: int) -> nn.Module:
        """peft's init (A kaiming-uniform, B zero) of the FULL matrix from a per-(layer, target) seed,
        then this rank's slice: the same adapter whatever the TP / PP layout."""
        features_in, features_out, _ = self.arch.lora_shape(target)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + global_layer * 101 + sorted(TARGETS).index(target))
        a = torch.empty(r, features_in)
        bound = 1.0 / math.sqrt(features_in)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
        a.uniform_(-bound, bound, generator=gen)
        b = torch.zeros(features_out, r)
        a, b = self.shard(target, a, b)
        module = nn.Module()
        module.lora_A = nn.Parameter(a)
        module.lora_B = nn.Parameter(b)
        return module

    def shard(self, target: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's (A, B) from the full peft matrices A [r, in], B [out, r]."""
        if TARGETS[target][1] == "column":
            return a.clone(), b.chunk(self.tp, dim=0)[self.tp_rank].clone()
        return a.chunk(self.tp, dim=1)[self.tp_rank].clone(), b.clone()

    # ------------------------------------------------------------------ forward
    def _hook(self, local: int, module_path: str, targets: list[str]):
        def hook(module, inputs, output):
            from megatron.core.tensor_parallel import (
                copy_to_tensor_model_parallel_region,
                gather_from_sequence_parallel_region,
                reduce_from_tensor_model_parallel_region,
                reduce_scatter_to_sequence_parallel_region,
            )
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            out, bias = output
            column = TARGETS[targets[0]][1] == "column"
            if column:  # replicated input: the same mask on every TP rank (default stream)
                x = self.dropout(inputs[0])
            else:  # this rank's slice of the input: its own TP stream, as megatron's attention dropout
                with get_cuda_rng_tracker().fork():
                    x = self.dropout(inputs[0])
            if column and self.sequence_parallel:  # [s/tp, b, h] -> [s, b, h]; backward reduce-scatters
                x = gather_from_sequence_parallel_region(x)
            deltas = {}
            x = x.to(next(self.parameters()).dtype)  # as peft: the adapter's dtype (fp32 on a bf16 base)
            for target in targets:
                adapter = self.adapters[f"{local}-{target}"]
                u = x @ adapter.lora_A.t()
                if self.sequence_parallel:
                    # column: x's gradient is summed by the reduce-scatter above, A's by the engine's
                    # sequence-parallel gradient sum; row: partial sums reduce-scattered to sequence slices.
                    u = u if column else reduce_scatter_to_sequence_parallel_region(u)
                elif column:
                    u = copy_to_tensor_model_parallel_region(u)
                else:
                    u = reduce_from_tensor_model_parallel_region(u)
                deltas[TARGETS[target][2] or target] = u @ adapter.lora_B.t()
            return out + (self.scaling * self._assemble(module_path, deltas, out)).to(out.dtype), bias

        return hook

    def _assemble(self, module_path: str, deltas: dict[str, Tensor], like: Tensor) -> Tensor:
        """Pieces in the fused output layout of this rank (zeros for pieces without an adapter)."""
        if module_path.endswith("linear_qkv"):
            a, tp = self.arch, self.tp
            groups, per_group, hd = a.num_kv_heads // tp, a.num_heads // a.num_kv_heads, a.head_dim
            lead = like.shape[:-1]
            sizes = {"q": per_group * hd, "k": hd, "v": hd}
            parts = [deltas[p].reshape(*lead, groups, n) if p in deltas else like.new_zeros(*lead, groups, n)
                     for p, n in sizes.items()]
            return torch.cat(parts, dim=-1).reshape(like.shape)
        if module_path.endswith("linear_fc1"):
            half = like.shape[-1] // 2
            lead = like.shape[:-1]
            return torch.cat([deltas.get(p, like.new_zeros(*lead, half)) for p in ("gate", "up")], dim=-1)
        return next(iter(deltas.values()))

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge_into(self, model) -> None:
        """W += scaling * B @ A on every local shard, then detach the hooks (the adapters are spent)."""
        layers = model.decoder.layers
        for key, adapter in self.adapters.items():
            local, target = key.split("-", 1)
            module_path = TARGETS[target][0]
            weight = layers[int(local)].get_submodule(module_path).weight
            delta = self.scaling * adapter.lora_B @ adapter.lora_A  # [out_local, in] or [out, in_local]
            if TARGETS[target][1] == "row":
                weight += delta.to(weight.dtype)
                continue
            # Column: place the piece's rows in the fused layout (the same assembly as the forward, on W^T).
            weight += self._assemble(module_path, {TARGETS[target][2]: delta.t()}, weight.t()).t().to(weight.dtype)
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ names and checkpoints
    def global_layer(self, key: str) -> int:
        return self.layer_offset + int(key.split("-", 1)[0])

    def sharded_names(self) -> set[str]:
        """Adapter tensors split across TP (column B, row A); the others are replicated."""
        return {f"adapters.{k}.lora_{'B' if TARGETS[k.split('-', 1)[1]][1] == 'column' else 'A'}" for k in self.adapters}

    def sharded_state_dict(self, dp_rank: int) -> dict:
        """ShardedTensors keyed by global layer, so adapters reshard across TP / PP like the backbone."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        out = {}
        for key, adapter in self.adapters.items():
            local, target = key.split("-", 1)
            global_key = f"lora.layers.{self.global_layer(key)}.{target}"
            column = TARGETS[target][1] == "column"
            a_axis, b_axis = (None, 0) if column else (1, None)
            for which, tensor, axis in (("A", adapter.lora_A, a_axis), ("B", adapter.lora_B, b_axis)):
                if axis is None:  # replicated over TP
                    st = ShardedTensor.from_rank_offsets(f"{global_key}.lora_{which}", tensor,
                                                         replica_id=(0, self.tp_rank, dp_rank))
                else:
                    st = ShardedTensor.from_rank_offsets(f"{global_key}.lora_{which}", tensor,
                                                         (axis, self.tp_rank, self.tp), replica_id=(0, 0, dp_rank))
                out[f"{key}.lora_{which}"] = st
        return out


def unshard(target: str, parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Full peft (A, B) of one adapter from its TP shards (in TP-rank order)."""
    if TARGETS[target][1] == "column":
        return parts[0][0], torch.cat([b for _, b in parts], dim=0)
    return torch.cat([a for a, _ in parts], dim=1), parts[0][1]
