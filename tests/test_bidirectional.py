"""Every family in SUPPORTED_FAMILIES is proven here, on tiny random fp32 models (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from toolkit.models.bidirectional import (
    SUPPORTED_FAMILIES,
    UnsupportedFamilyError,
    check_bidirectional,
    is_bidirectional,
    make_bidirectional,
)
from toolkit.models.tiny import TINY_MODEL_TYPES, tiny_config, tiny_model

FAMILIES = sorted(SUPPORTED_FAMILIES)
NO_SDPA = {"gemma2"}  # transformers refuses sdpa for Gemma2 (logit softcapping)
FAMILY_IMPLS = [(f, impl) for f in FAMILIES for impl in ("eager", "sdpa") if not (f in NO_SDPA and impl == "sdpa")]
TOL = 1e-5
LENGTHS = (5, 9, 13)  # row 0 is the short text, padded inside the batch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: a second intra-op thread only adds sync cost (100x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _texts(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g) for n in LENGTHS]  # never the pad id 0


def _pad(texts: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(t) for t in texts)
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        sl = slice(0, len(t)) if side == "right" else slice(width - len(t), width)
        ids[i, sl], mask[i, sl] = t, 1
    return ids, mask


@torch.no_grad()
def _hidden(base, ids, mask=None) -> torch.Tensor:
    return base(input_ids=ids, attention_mask=mask).last_hidden_state


def _first_shift(forward, texts, side: str | None) -> float:
    """Change the LAST real token of text 0; how much does its FIRST real token's state move?"""
    changed = [t.clone() for t in texts]
    changed[0][-1] = (changed[0][-1] + 1) % 300 + 3
    if side is None:  # batch size 1, no attention mask: the path where the reference went causal
        a, b = forward(texts[0][None], None), forward(changed[0][None], None)
        first = 0
    else:
        (ids, mask), (ids2, _) = _pad(texts, side), _pad(changed, side)
        a, b = forward(ids, mask), forward(ids2, mask)
        first = int(mask[0].argmax())
    return (a[0, first] - b[0, first]).abs().max().item()


def test_tiny_families_are_the_supported_ones():
    assert set(TINY_MODEL_TYPES) == SUPPORTED_FAMILIES


# ---------------------------------------------------------------- a. last token reaches position 0
@pytest.mark.parametrize("family,impl", FAMILY_IMPLS)
def test_last_token_reaches_position_0(family, impl):
    model = tiny_model(family, attn_implementation=impl)
    base, texts = model.model, _texts()
    fwd = lambda ids, mask: _hidden(base, ids, mask)  # noqa: E731
    # Control: the unconverted model is causal on every path, so this test can fail.
    assert not is_bidirectional(model)
    for side in (None, "right", "left"):
        assert _first_shift(fwd, texts, side) < 1e-7, side
    with pytest.raises(RuntimeError, match="still causal"):
        check_bidirectional(model)

    assert make_bidirectional(model) is model
    assert is_bidirectional(model) and is_bidirectional(base) and is_bidirectional(model.config)
    for side in (None, "right", "left"):  # None = batch size 1 without mask (reference bug #74)
        assert _first_shift(fwd, texts, side) > 1e-3, side
    check_bidirectional(model)
    check_bidirectional(base, input_ids=texts[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_config_flag_before_loading(family):
    """The loader's path: flag the config, then build the model from it."""
    cfg = make_bidirectional(tiny_config(family))
    assert is_bidirectional(cfg)
    torch.manual_seed(0)
    check_bidirectional(AutoModelForCausalLM.from_config(cfg).eval())


# ---------------------------------------------------------------- b. padding invariance
@pytest.mark.parametrize("family,impl", FAMILY_IMPLS)
def test_text_embeds_identically_alone_and_padded(family, impl):
    base = make_bidirectional(tiny_model(family, attn_implementation=impl)).model
    texts = _texts(1)
    alone = _hidden(base, texts[0][None])[0]
    alone_masked = _hidden(base, texts[0][None], torch.ones(1, len(texts[0]), dtype=torch.long))[0]
    assert (alone - alone_masked).abs().max().item() <= TOL
    for side in ("right", "left"):
        ids, mask = _pad(texts, side)
        real = _hidden(base, ids, mask)[0][mask[0].bool()]
        assert (real - alone).abs().max().item() <= TOL, side
        # Sensitivity: without the padding mask the pads leak into the text.
        leaked = _hidden(base, ids)[0][mask[0].bool()]
        assert (leaked - alone).abs().max().item() > 1e-3, side


# ---------------------------------------------------------------- c. eager vs sdpa
def _impls_agree(family, other):
    eager = make_bidirectional(tiny_model(family, attn_implementation="eager")).model
    fast = make_bidirectional(tiny_model(family, attn_implementation=other)).model
    assert fast.config._attn_implementation == other
    for side in ("right", "left"):
        ids, mask = _pad(_texts(2), side)
        keep = mask.bool()
        diff = (_hidden(eager, ids, mask)[keep] - _hidden(fast, ids, mask)[keep]).abs().max().item()
        assert diff <= TOL, (side, diff)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NO_SDPA])
def test_eager_matches_sdpa(family):
    """Families in NO_SDPA (softcapping) have no sdpa path in transformers; flex covers them below."""
    _impls_agree(family, "sdpa")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_eager_matches_flex(family):
    _impls_agree(family, "flex_attention")  # torch.compile on CPU: ~45 s for all families


# ---------------------------------------------------------------- d. save / reload without our code
@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_keeps_it_bidirectional(family, tmp_path):
    model = make_bidirectional(tiny_model(family))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["is_causal"] is False
    reloaded = AutoModel.from_pretrained(tmp_path).eval()  # plain transformers, as sentence-transformers does
    assert reloaded.config.is_causal is False and is_bidirectional(reloaded)
    texts = _texts(3)
    fwd = lambda ids, mask: _hidden(reloaded, ids, mask)  # noqa: E731
    assert _first_shift(fwd, texts, None) > 1e-3
    ids, mask = _pad(texts, "right")
    keep = mask.bool()
    assert (_hidden(reloaded, ids, mask)[keep] - _hidden(model.model, ids, mask)[keep]).abs().max().item() <= TOL
    check_bidirectional(reloaded)


def test_sentence_transformers_folder_is_bidirectional(tmp_path, tiny_tokenizer):
    from sentence_transformers import SentenceTransformer

    tok = tiny_tokenizer
    model = tiny_model("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    make_bidirectional(model).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    st = SentenceTransformer(str(tmp_path), device="cpu")
    a, b = st.encode(["the cat sat on the mat", "the cat sat on the dog"], output_value="token_embeddings")
    assert (a[0] - b[0]).abs().max().item() > 1e-3  # BOS state sees the last word


# ---------------------------------------------------------------- e. peft LoRA + gradient checkpointing
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_lora_with_gradient_checkpointing(family):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(family)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert make_bidirectional(peft_model) is peft_model  # accepts the wrapper
    peft_model.train()
    assert model.model.gradient_checkpointing and model.training

    ids, mask = _pad(_texts(4), "left")
    out = peft_model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)

    def fwd(ids, mask):  # train mode, grad enabled: the checkpointed path
        return peft_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]

    texts = _texts(5)
    for side in (None, "left", "right"):
        assert _first_shift(fwd, texts, side) > 1e-3, side
    check_bidirectional(peft_model)
    assert peft_model.training  # the self-check restores the mode


# ---------------------------------------------------------------- f. unsupported families fail loudly
def _tiny_gpt2():
    return AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)


@pytest.mark.parametrize("make", [_tiny_gpt2, lambda: AutoConfig.for_model(
    "phi", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)])
def test_unsupported_family_raises(make):
    cfg = make()
    with pytest.raises(UnsupportedFamilyError, match=cfg.model_type) as info:
        make_bidirectional(cfg)
    assert isinstance(info.value, ValueError) and "llama" in str(info.value)
    assert not hasattr(cfg, "is_causal") and not is_bidirectional(cfg)


def test_unsupported_model_names_its_path_and_fails_the_self_check():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_gpt2()).eval()
    model.config._name_or_path = "/models/my-gpt2"
    with pytest.raises(UnsupportedFamilyError, match=r"gpt2.*/models/my-gpt2"):
        make_bidirectional(model)
    with pytest.raises(RuntimeError, match="still causal"):
        check_bidirectional(model)


# ---------------------------------------------------------------- sliding windows and family flags
def _reach(base, length=10):
    """Positions j whose token change moves position 0 (1-layer model), bs 1 and a padded batch."""
    ids = torch.arange(3, 3 + length)[None].repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # forces a materialized mask
    ref = _hidden(base, ids, mask)[0, 0]
    reached = []
    for j in range(1, length):
        x = ids.clone()
        x[:, j] = 200
        if (_hidden(base, x, mask)[0, 0] - ref).abs().max() > 1e-6:
            reached.append(j)
    return reached


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text"])
def test_sliding_window_becomes_symmetric(family):
    """is_causal=False: a sliding layer sees |i - j| <= window on both sides (sdpa/eager masks)."""
    extra = {} if family == "mistral" else {"layer_types": ["sliding_attention"]}
    for impl in ("eager",) if family in NO_SDPA else ("eager", "sdpa"):
        model = tiny_model(family, attn_implementation=impl, num_hidden_layers=1, sliding_window=4, **extra)
        assert _reach(make_bidirectional(model).model) == [1, 2, 3, 4], impl


def test_gemma3_native_flag_is_kept():
    """A Gemma3 config already bidirectional by its own flag keeps its (exclusive, halved) window."""
    model = tiny_model("gemma3_text", num_hidden_layers=1, layer_types=["sliding_attention"],
                       sliding_window=4, use_bidirectional_attention=True)
    assert is_bidirectional(model)
    make_bidirectional(model)
    assert not hasattr(model.config, "is_causal")
    assert _reach(model.model) == [1, 2]  # window 4 -> 4 // 2 + 1 = 3, exclusive
    check_bidirectional(model, input_ids=torch.tensor([5, 6, 7]))  # probe must fit in the window


def test_gemma_family_flag_alone_stays_causal_with_padding():
    """Why we don't use Gemma's `use_bidirectional_attention`: its masks ignore it once padded."""
    model = tiny_model("gemma", use_bidirectional_attention=True)
    fwd = lambda ids, mask: _hidden(model.model, ids, mask)  # noqa: E731
    assert _first_shift(fwd, _texts(), "right") < 1e-7
    assert not is_bidirectional(model)
