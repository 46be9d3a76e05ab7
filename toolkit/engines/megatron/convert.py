"""HF <-> Megatron-core weights for the Llama / Mistral / Qwen2 family, for any TP x PP split.

Pure re-layout (no arithmetic), so the same functions map gradients and optimizer moments too.
Megatron layouts handled here:
- `linear_qkv`: rows grouped by KV group, [q heads of the group | k | v] per group; a TP rank owns
  num_kv_heads / tp consecutive groups.
- `linear_fc1` (SwiGLU): each TP rank's rows are [its gate slice ; its up slice].
- column-parallel (qkv, fc1, embedding, output layer) split rows; row-parallel (proj, fc2) columns;
  norms are replicated. Vocabulary rows are zero-padded to a multiple of tp.
- pipeline stage p holds global layers `ModelArgs.stage_layers(pp, p, first, last)` (even, or
  megatron's uneven first / last stage) as local layers 0..n-1.
Loading reads only this rank's rows / columns when the source can slice (`HFWeights.read`: one
`get_slice` per piece); a plain dict of tensors is sliced in memory, with the same result.
"""

from __future__ import annotations

import torch
from torch import Tensor

from toolkit.errors import CheckpointError
from toolkit.models.arch import ModelArgs

_HF_LAYER = "model.layers.{i}."
_MG_LAYER = "decoder.layers.{i}."


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, arch: ModelArgs) -> Tensor:
    """[q;k;v] in megatron's per-KV-group order (works for weights [*, h] and biases [*]); q, k, v may
    hold any whole number of KV groups (a TP rank's)."""
    per_group, hd = arch.num_heads // arch.num_kv_heads, arch.head_dim
    groups, tail = k.shape[0] // hd, q.shape[1:]
    q = q.reshape(groups, per_group * hd, *tail)
    k = k.reshape(groups, hd, *tail)
    v = v.reshape(groups, hd, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _split_qkv(qkv: Tensor, arch: ModelArgs) -> tuple[Tensor, Tensor, Tensor]:
    groups, per_group, hd = arch.num_kv_heads, arch.num_heads // arch.num_kv_heads, arch.head_dim
    tail = qkv.shape[1:]
    x = qkv.reshape(groups, (per_group + 2) * hd, *tail)
    q = x[:, : per_group * hd].reshape(-1, *tail)
    k = x[:, per_group * hd : (per_group + 1) * hd].reshape(-1, *tail)
    v = x[:, (per_group + 1) * hd :].reshape(-1, *tail)
    return q, k, v


class _Reader:
    """Pieces of the source's tensors: sliced on read when the source can (`HFWeights`), else cut
    from the whole tensor."""

    def __init__(self, hf, arch: ModelArgs, source: str):
        self.hf, self.arch, self.source = hf, arch, source
        self.sliced = callable(getattr(hf, "read", None))

    def __contains__(self, name: str) -> bool:
        return name in self.hf

    def __call__(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> Tensor:
        if name not in self.hf:
            raise CheckpointError(f"{self.source}: tensor {name!r} is missing (is this a {self.arch.model_type} checkpoint?)")
        if self.sliced:
            return self.hf.read(name, rows=rows, cols=cols)
        t = self.hf[name]
        t = t[rows[0]:rows[1]] if rows else t
        return (t[:, cols[0]:cols[1]] if cols else t).clone()


def _part(n: int, tp: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s [start, stop) of n rows or columns split evenly over tp."""
    per = n // tp
    return rank * per, (rank + 1) * per


def _vocab_rows(read: _Reader, name: str, arch: ModelArgs, tp: int, rank: int) -> Tensor:
    """This rank's rows of the vocabulary padded to a multiple of tp (pad rows are zeros)."""
    start, stop = _part(arch.padded_vocab(tp), tp, rank)
    real = read(name, rows=(min(start, arch.vocab_size), min(stop, arch.vocab_size)))
    extra = stop - start - real.shape[0]
    return torch.cat([real, real.new_zeros(extra, *real.shape[1:])]) if extra else real


def hf_to_megatron(hf, arch: ModelArgs, *, tp: int, tp_rank: int, pp: int, pp_rank: int, include_head: bool = True,
                   source: str = "HF checkpoint", first_stage_layers: int = 0, last_stage_layers: int = 0
                   ) -> dict[str, Tensor]:
    """The megatron state dict of rank (tp_rank, pp_rank) from a full HF `*ForCausalLM` state dict.

    `hf` is any mapping of HF names to tensors; an `HFWeights` reads only this rank's bytes from disk.
    """
    arch.check_parallel(tp, pp, first_stage_layers, last_stage_layers)
    read = _Reader(hf, arch, source)
    per_group, hd, groups = arch.num_heads // arch.num_kv_heads, arch.head_dim, arch.num_kv_heads // tp
    g0 = tp_rank * groups  # this rank's first KV group
    q_rows, kv_rows = (g0 * per_group * hd, (g0 + groups) * per_group * hd), (g0 * hd, (g0 + groups) * hd)
    f_rows, q_cols = _part(arch.ffn_hidden_size, tp, tp_rank), _part(arch.dim("q"), tp, tp_rank)

    def qkv(attn: str, suffix: str) -> Tensor:
        return _fuse_qkv(read(attn + f"q_proj.{suffix}", rows=q_rows), read(attn + f"k_proj.{suffix}", rows=kv_rows),
                         read(attn + f"v_proj.{suffix}", rows=kv_rows), arch)

    out: dict[str, Tensor] = {}
    if pp_rank == 0:
        out["embedding.word_embeddings.weight"] = _vocab_rows(read, "model.embed_tokens.weight", arch, tp, tp_rank)
    layers = arch.stage_layers(pp, pp_rank, first_stage_layers, last_stage_layers)
    for local, i in enumerate(layers):
        h, m = _HF_LAYER.format(i=i), _MG_LAYER.format(i=local)
        attn = h + "self_attn."
        out[m + "self_attention.linear_qkv.weight"] = qkv(attn, "weight")
        if arch.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = qkv(attn, "bias")
        out[m + "self_attention.linear_proj.weight"] = read(attn + "o_proj.weight", cols=q_cols)
        out[m + "mlp.linear_fc1.weight"] = torch.cat([read(h + "mlp.gate_proj.weight", rows=f_rows),
                                                      read(h + "mlp.up_proj.weight", rows=f_rows)])
        out[m + "mlp.linear_fc2.weight"] = read(h + "mlp.down_proj.weight", cols=f_rows)
        out[m + "input_layernorm.weight"] = read(h + "input_layernorm.weight")
        out[m + "pre_mlp_layernorm.weight"] = read(h + "post_attention_layernorm.weight")
    if pp_rank == pp - 1:
        out["decoder.final_layernorm.weight"] = read("model.norm.weight")
    if pp_rank == pp - 1 and include_head:
        head = "lm_head.weight"
        if head not in read:
            if not arch.tied_embeddings:
                raise CheckpointError(f"{source}: lm_head.weight is missing and the config does not tie embeddings")
            head = "model.embed_tokens.weight"
        out["output_layer.weight"] = _vocab_rows(read, head, arch, tp, tp_rank)
    return out


def megatron_layer_to_hf(parts: list[dict[str, Tensor]], arch: ModelArgs, layer: int) -> dict[str, Tensor]:
    """HF tensors of global layer `layer` from its TP pieces (`parts[t]`: tp rank t's tensors of that layer,
    named as under `decoder.layers.<local>.`, e.g. `mlp.linear_fc1.weight`). Missing names are skipped."""
    h = _HF_LAYER.format(i=layer)
    attn = h + "self_attn."
    hf: dict[str, Tensor] = {}

    def gather(name: str, dim: int) -> Tensor | None:
        pieces = [p.get(name) for p in parts]
        if any(p is None for p in pieces):
            return None
        return torch.cat(pieces, dim=dim) if dim >= 0 else pieces[0]

    def put(name: str, value: Tensor | None) -> None:
        if value is not None:
            hf[name] = value

    for suffix in ("weight", "bias"):
        qkv = gather(f"self_attention.linear_qkv.{suffix}", 0)
        if qkv is not None:
            q, k, v = _split_qkv(qkv, arch)
            put(attn + f"q_proj.{suffix}", q)
            put(attn + f"k_proj.{suffix}", k)
            put(attn + f"v_proj.{suffix}", v)
    put(attn + "o_proj.weight", gather("self_attention.linear_proj.weight", 1))
    fc1 = [p.get("mlp.linear_fc1.weight") for p in parts]
    if all(f is not None for f in fc1):
        halves = [f.chunk(2, dim=0) for f in fc1]
        put(h + "mlp.gate_proj.weight", torch.cat([g for g, _ in halves]))
        put(h + "mlp.up_proj.weight", torch.cat([u for _, u in halves]))
    put(h + "mlp.down_proj.weight", gather("mlp.linear_fc2.weight", 1))
    put(h + "input_layernorm.weight", gather("input_layernorm.weight", -1))
    put(h + "post_attention_layernorm.weight", gather("pre_mlp_layernorm.weight", -1))
    return hf


def hf_layer_shapes(arch: ModelArgs, layer: int) -> dict[str, tuple[int, ...]]:
    """The HF names and shapes of global layer `layer` (what `megatron_layer_to_hf` produces from weights)."""
    h, attn = _HF_LAYER.format(i=layer), _HF_LAYER.format(i=layer) + "self_attn."
    hidden, hd, ffn = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    q, kv = arch.num_heads * hd, arch.num_kv_heads * hd
    shapes = {attn + "q_proj.weight": (q, hidden), attn + "k_proj.weight": (kv, hidden),
              attn + "v_proj.weight": (kv, hidden)}
    if arch.qkv_bias:
        shapes.update({attn + "q_proj.bias": (q,), attn + "k_proj.bias": (kv,), attn + "v_proj.bias": (kv,)})
    shapes.update({attn + "o_proj.weight": (hidden, q), h + "mlp.gate_proj.weight": (ffn, hidden),
                   h + "mlp.up_proj.weight": (ffn, hidden), h + "mlp.down_proj.weight": (hidden, ffn),
                   h + "input_layernorm.weight": (hidden,), h + "post_attention_layernorm.weight": (hidden,)})
    return shapes


def megatron_to_hf(shards: dict[tuple[int, int], dict[str, Tensor]], arch: ModelArgs, *, tp: int, pp: int,
                   include_head: bool = True, first_stage_layers: int = 0, last_stage_layers: int = 0
                   ) -> dict[str, Tensor]:
    """A full HF state dict from every rank's megatron state dict, keyed by (tp_rank, pp_rank).

    Tensors missing from the shards (e.g. frozen weights when mapping gradients) are skipped, so the
    same function maps parameters, gradients and optimizer moments. (Whole model in one process: for
    tests and small models; the engine's export streams layer by layer, see `hf_export`.)
    """
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in shards]
    if missing:
        raise CheckpointError(f"megatron_to_hf: shards of (tp_rank, pp_rank) {missing} are missing")
    hf: dict[str, Tensor] = {}

    def gather(pp_rank: int, name: str, dim: int) -> Tensor | None:
        parts = [shards[(t, pp_rank)].get(name) for t in range(tp)]
        if any(p is None for p in parts):
            return None
        return torch.cat(parts, dim=dim) if dim >= 0 else parts[0]

    def put(name: str, value: Tensor | None) -> None:
        if value is not None:
            hf[name] = value

    emb = gather(0, "embedding.word_embeddings.weight", 0)
    put("model.embed_tokens.weight", None if emb is None else emb[: arch.vocab_size])
    for p in range(pp):
        for local, i in enumerate(arch.stage_layers(pp, p, first_stage_layers, last_stage_layers)):
            m = _MG_LAYER.format(i=local)
            parts = [{k.removeprefix(m): v for k, v in shards[(t, p)].items() if k.startswith(m)} for t in range(tp)]
            hf.update(megatron_layer_to_hf(parts, arch, i))
    put("model.norm.weight", gather(pp - 1, "decoder.final_layernorm.weight", -1))
    if include_head:
        head = gather(pp - 1, "output_layer.weight", 0)
        put("lm_head.weight", None if head is None else head[: arch.vocab_size])
    return hf
