"""HF <-> Megatron-core weights for the Llama / Mistral / Qwen2 family, for any TP x PP split.

Pure re-layout (no arithmetic), so the same functions map gradients and optimizer moments too.
Megatron layouts handled here:
- `linear_qkv`: rows grouped by KV group, [q heads of the group | k | v] per group; a TP rank owns
  num_kv_heads / tp consecutive groups.
- `linear_fc1` (SwiGLU): each TP rank's rows are [its gate slice ; its up slice].
- column-parallel (qkv, fc1, embedding, output layer) split rows; row-parallel (proj, fc2) columns;
  norms are replicated. Vocabulary rows are zero-padded to a multiple of tp.
- pipeline stage p holds global layers [p*L/pp, (p+1)*L/pp) as local layers 0..L/pp-1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from toolkit.errors import CheckpointError
from toolkit.models.arch import ModelArgs

_HF_LAYER = "model.layers.{i}."
_MG_LAYER = "decoder.layers.{i}."


def _stage_layers(arch: ModelArgs, pp: int, pp_rank: int) -> range:
    per = arch.num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def _pad_vocab(w: Tensor, arch: ModelArgs, tp: int) -> Tensor:
    extra = arch.padded_vocab(tp) - w.shape[0]
    return torch.cat([w, w.new_zeros(extra, *w.shape[1:])]) if extra else w


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, arch: ModelArgs) -> Tensor:
    """[q;k;v] in megatron's per-KV-group order (works for weights [*, h] and biases [*])."""
    groups, per_group, hd = arch.num_kv_heads, arch.num_heads // arch.num_kv_heads, arch.head_dim
    tail = q.shape[1:]
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


def _rows(t: Tensor, tp: int, rank: int) -> Tensor:
    return t.chunk(tp, dim=0)[rank].clone()


def _cols(t: Tensor, tp: int, rank: int) -> Tensor:
    return t.chunk(tp, dim=1)[rank].clone()


def hf_to_megatron(hf, arch: ModelArgs, *, tp: int, tp_rank: int, pp: int, pp_rank: int, include_head: bool = True,
                   source: str = "HF checkpoint") -> dict[str, Tensor]:
    """The megatron state dict of rank (tp_rank, pp_rank) from a full HF `*ForCausalLM` state dict.

    `hf` is any mapping of HF names to tensors (a lazy one reads only this rank's tensors from disk).
    """

    def get(name: str) -> Tensor:
        if name not in hf:
            raise CheckpointError(f"{source}: tensor {name!r} is missing (is this a {arch.model_type} checkpoint?)")
        return hf[name]

    out: dict[str, Tensor] = {}
    if pp_rank == 0:
        out["embedding.word_embeddings.weight"] = _rows(_pad_vocab(get("model.embed_tokens.weight"), arch, tp), tp, tp_rank)
    for local, i in enumerate(_stage_layers(arch, pp, pp_rank)):
        h, m = _HF_LAYER.format(i=i), _MG_LAYER.format(i=local)
        attn = h + "self_attn."
        qkv = _fuse_qkv(get(attn + "q_proj.weight"), get(attn + "k_proj.weight"), get(attn + "v_proj.weight"), arch)
        out[m + "self_attention.linear_qkv.weight"] = _rows(qkv, tp, tp_rank)
        if arch.qkv_bias:
            bias = _fuse_qkv(get(attn + "q_proj.bias"), get(attn + "k_proj.bias"), get(attn + "v_proj.bias"), arch)
            out[m + "self_attention.linear_qkv.bias"] = _rows(bias, tp, tp_rank)
        out[m + "self_attention.linear_proj.weight"] = _cols(get(attn + "o_proj.weight"), tp, tp_rank)
        gate, up = get(h + "mlp.gate_proj.weight"), get(h + "mlp.up_proj.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([_rows(gate, tp, tp_rank), _rows(up, tp, tp_rank)])
        out[m + "mlp.linear_fc2.weight"] = _cols(get(h + "mlp.down_proj.weight"), tp, tp_rank)
        out[m + "input_layernorm.weight"] = get(h + "input_layernorm.weight").clone()
        out[m + "pre_mlp_layernorm.weight"] = get(h + "post_attention_layernorm.weight").clone()
    if pp_rank == pp - 1:
        out["decoder.final_layernorm.weight"] = get("model.norm.weight").clone()
    if pp_rank == pp - 1 and include_head:
        head = hf.get("lm_head.weight")
        if head is None:
            if not arch.tied_embeddings:
                raise CheckpointError(f"{source}: lm_head.weight is missing and the config does not tie embeddings")
            head = get("model.embed_tokens.weight")
        out["output_layer.weight"] = _rows(_pad_vocab(head, arch, tp), tp, tp_rank)
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
                   include_head: bool = True) -> dict[str, Tensor]:
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
    per = arch.num_layers // pp
    for p in range(pp):
        for local in range(per):
            m = _MG_LAYER.format(i=local)
            parts = [{k.removeprefix(m): v for k, v in shards[(t, p)].items() if k.startswith(m)} for t in range(tp)]
            hf.update(megatron_layer_to_hf(parts, arch, p * per + local))
    put("model.norm.weight", gather(pp - 1, "decoder.final_layernorm.weight", -1))
    if include_head:
        head = gather(pp - 1, "output_layer.weight", 0)
        put("lm_head.weight", None if head is None else head[: arch.vocab_size])
    return hf
