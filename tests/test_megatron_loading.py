"""Sliced loading of HF weights into megatron shards: each rank reads only its rows / columns
(`safe_open(...).get_slice`, one open per file), and the result is bit-identical to converting whole
tensors, for every TP rank, Qwen2 biases, a vocabulary not divisible by tp, sharded index folders
and encoder folders (prefix "model.")."""

from __future__ import annotations

import pytest
import torch

import toolkit.engines.megatron.weights as weights_module
from toolkit.engines.megatron.convert import hf_to_megatron
from toolkit.engines.megatron.weights import HFWeights
from toolkit.models.arch import ModelArgs
from toolkit.models.tiny import tiny_model


def _whole_tensor_reference(hf: dict, arch: ModelArgs, tp: int, t: int, layers: range, head: bool = True) -> dict:
    """The conversion as it was before sliced reads: pad / fuse the whole tensor, then cut rank t's piece."""
    groups, per_group, hd = arch.num_kv_heads, arch.num_heads // arch.num_kv_heads, arch.head_dim

    def rows(x):
        return x.chunk(tp, dim=0)[t].clone()

    def cols(x):
        return x.chunk(tp, dim=1)[t].clone()

    def pad(w):
        extra = arch.padded_vocab(tp) - w.shape[0]
        return torch.cat([w, w.new_zeros(extra, *w.shape[1:])]) if extra else w

    def fuse(q, k, v):
        tail = q.shape[1:]
        parts = [q.reshape(groups, per_group * hd, *tail), k.reshape(groups, hd, *tail), v.reshape(groups, hd, *tail)]
        return torch.cat(parts, dim=1).reshape(-1, *tail)

    out = {}
    if layers.start == 0:
        out["embedding.word_embeddings.weight"] = rows(pad(hf["model.embed_tokens.weight"]))
    for local, i in enumerate(layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{local}."
        a = h + "self_attn."
        for suffix in ("weight", "bias") if arch.qkv_bias else ("weight",):
            qkv = fuse(*(hf[a + f"{n}_proj.{suffix}"] for n in "qkv"))
            out[m + f"self_attention.linear_qkv.{suffix}"] = rows(qkv)
        out[m + "self_attention.linear_proj.weight"] = cols(hf[a + "o_proj.weight"])
        out[m + "mlp.linear_fc1.weight"] = torch.cat([rows(hf[h + "mlp.gate_proj.weight"]),
                                                      rows(hf[h + "mlp.up_proj.weight"])])
        out[m + "mlp.linear_fc2.weight"] = cols(hf[h + "mlp.down_proj.weight"])
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"].clone()
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"].clone()
    if layers.stop == arch.num_layers:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
        if head:
            out["output_layer.weight"] = rows(pad(hf.get("lm_head.weight", hf["model.embed_tokens.weight"])))
    return out


def _assert_identical(got: dict, want: dict, where) -> None:
    assert sorted(got) == sorted(want), where
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, (where, name)
        assert torch.equal(got[name], want[name]), (where, name)


@pytest.fixture
def count_opens(monkeypatch):
    opened: list[str] = []
    real = weights_module.safe_open

    def counting(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(weights_module, "safe_open", counting)
    return opened


# (model_type, vocab, KV heads, split): llama with GQA and an uneven PP3 split; qwen2 (q/k/v biases)
# with MHA, vocab 387 (not divisible by 2 or 4) and an even PP2 split; tied embeddings for llama.
CASES = [("llama", 390, 4, dict(pp=3, first=1, last=1), dict(tie_word_embeddings=True)),
         ("qwen2", 387, 4, dict(pp=2, first=0, last=0), {})]


@pytest.mark.parametrize("model_type,vocab,kv,split,extra", CASES, ids=[c[0] for c in CASES])
def test_sliced_loading_is_bit_identical_to_whole_tensor_conversion(tmp_path, count_opens, model_type, vocab, kv,
                                                                    split, extra):
    model = tiny_model(model_type, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=kv,
                       vocab_size=vocab, **extra).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")  # several files + an index
    files = len(list((tmp_path / "sharded").glob("*.safetensors")))
    assert files > 2
    hf = {k: v.clone() for k, v in model.state_dict().items()}
    if extra.get("tie_word_embeddings"):
        hf.pop("lm_head.weight", None)  # what the saved folder holds
    arch = ModelArgs.from_hf_config(model.config)
    assert arch.qkv_bias == (model_type == "qwen2")
    pp, first, last = split["pp"], split["first"], split["last"]
    for folder, reader in (("single", "pread"), ("sharded", "pread"), ("single", "mmap"), ("sharded", "mmap")):
        for tp in (1, 2, 4):
            for p in range(pp):
                for t in range(tp):
                    count_opens.clear()
                    with HFWeights(tmp_path / folder, reader=reader) as weights:
                        got = hf_to_megatron(weights, arch, tp=tp, tp_rank=t, pp=pp, pp_rank=p,
                                             first_stage_layers=first, last_stage_layers=last)
                        asked = weights.requested_bytes
                    assert len(count_opens) == len(set(count_opens)) <= (1 if folder == "single" else files)
                    layers = arch.stage_layers(pp, p, first, last)
                    want = _whole_tensor_reference(hf, arch, tp, t, layers)
                    _assert_identical(got, want, (folder, tp, t, p))
                    # only this rank's bytes were asked for: its shard's bytes less the zero padding rows
                    per = arch.padded_vocab(tp) // tp
                    pad_rows = per - max(0, min((t + 1) * per, vocab) - min(t * per, vocab))
                    vocab_tensors = (p == 0) + (p == pp - 1)
                    assert asked == sum(v.numel() * v.element_size() for v in got.values()) \
                        - vocab_tensors * pad_rows * arch.hidden_size * 2, (folder, tp, t, p)


def test_encoder_folder_with_prefix_loads_sliced(tmp_path, count_opens):
    """A stage's encoder folder stores the backbone without "model." (read with prefix="model.")."""
    model = tiny_model("qwen2", num_hidden_layers=2, vocab_size=387, num_key_value_heads=4)
    model.model.save_pretrained(tmp_path / "enc")
    arch = ModelArgs.from_hf_config(model.config)
    hf = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for tp in (1, 2, 4):
        for t in range(tp):
            count_opens.clear()
            with HFWeights(tmp_path / "enc", prefix="model.") as weights:
                got = hf_to_megatron(weights, arch, tp=tp, tp_rank=t, pp=1, pp_rank=0, include_head=False)
            assert len(count_opens) == 1  # the constructor's handle serves every read
            _assert_identical(got, _whole_tensor_reference(hf, arch, tp, t, range(2), head=False), (tp, t))


def test_weights_read_slices_and_close_their_handles(tmp_path):
    """Every dtype / rank of tensor, row and column slices, empty slices; both readers agree."""
    from safetensors.torch import save_file

    tensors = {"m": torch.randn(7, 5), "v": torch.arange(6, dtype=torch.int64), "s": torch.tensor(2.5),
               "b": torch.randn(4, 3).to(torch.bfloat16), "z": torch.zeros(0, 3)}
    (tmp_path / "m").mkdir()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    for reader in ("pread", "mmap"):
        weights = HFWeights(tmp_path / "m", reader=reader)
        for name, t in tensors.items():
            assert torch.equal(weights[name], t) and weights[name].dtype == t.dtype, (reader, name)
        assert torch.equal(weights.read("m", rows=(2, 5), cols=(1, 3)), tensors["m"][2:5, 1:3])
        assert torch.equal(weights.read("m", cols=(4, 5)), tensors["m"][:, 4:5])
        assert torch.equal(weights.read("b", rows=(1, 3)), tensors["b"][1:3])
        assert torch.equal(weights.read("v", rows=(2, 2)), tensors["v"][2:2])
        weights.close()
        assert torch.equal(weights.read("v", rows=(1, 4)), tensors["v"][1:4])  # reopened on demand
        weights.close()
    model = tiny_model("llama", num_hidden_layers=2)
    model.save_pretrained(tmp_path / "m")
    weights = HFWeights(tmp_path / "m")
    assert weights.read("model.norm.weight").shape == (model.config.hidden_size,)
    weights.close()
    assert weights.read("model.norm.weight").shape == (model.config.hidden_size,)  # reopened on demand
    weights.close()
