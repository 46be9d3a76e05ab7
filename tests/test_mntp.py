"""MNTP: masking eligibility and statistics, the shifted sparse loss, and mask-token resolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import build_tokenizer
from toolkit.objectives.mntp import MaskingSpec, mask_for_mntp, mntp_loss, resolve_mask_token

V = 50
MASK = 3


def spec(p: float = 0.2, strategy: str = "bert", special=frozenset({0, 1, 2})) -> MaskingSpec:
    return MaskingSpec(probability=p, strategy=strategy, mask_token_id=MASK, vocab_size=V, special_ids=special)


def big_batch(b: int = 64, s: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (b, s), generator=g)
    return ids, torch.ones_like(ids)


def test_loss_matches_full_logits_reference():
    torch.manual_seed(0)
    b, s, d = 3, 7, 16
    hidden = torch.randn(b, s, d, requires_grad=True)
    head = nn.Linear(d, V, bias=False)
    labels = torch.full((b, s), -100)
    labels[0, 2], labels[0, 6], labels[1, 1], labels[2, 4] = 5, 9, 11, 7
    loss = mntp_loss(hidden, head, labels)

    logits = head(hidden)[:, :-1].reshape(-1, V)  # full logits, then the usual causal-LM shift
    ref = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, ref, atol=1e-6)
    g_loss = torch.autograd.grad(loss, [hidden, head.weight])
    g_ref = torch.autograd.grad(ref, [hidden, head.weight])
    for a, r in zip(g_loss, g_ref):
        assert torch.allclose(a, r, atol=1e-6)


def test_loss_only_computes_logits_at_targets():
    seen = []
    head = nn.Linear(8, V)
    head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    labels = torch.full((2, 5), -100)
    labels[1, 3] = 4
    mntp_loss(torch.randn(2, 5, 8), head, labels)
    assert seen == [torch.Size([1, 8])]


def test_loss_without_targets_is_zero_with_graph():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = nn.Linear(8, V)
    loss = mntp_loss(hidden, head, torch.full((2, 5), -100))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and head.weight.grad is not None


def test_loss_upcasts_bf16_logits():
    hidden = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    head = nn.Linear(8, V).to(torch.bfloat16)
    labels = torch.tensor([[-100, 5, -100, 6], [-100, -100, 7, -100]])
    assert mntp_loss(hidden, head, labels).dtype == torch.float32


def test_masked_fraction_is_p():
    ids, att = big_batch()
    for p in (0.2, 0.8):
        _, labels = mask_for_mntp(ids, att, spec(p), torch.Generator().manual_seed(1))
        eligible = ids.numel() - ids.shape[0]  # the first token of each row can't be a target
        frac = (labels != -100).sum().item() / eligible
        assert abs(frac - p) < 0.01


def test_bert_80_10_10_split():
    ids, att = big_batch()
    out, labels = mask_for_mntp(ids, att, spec(0.5), torch.Generator().manual_seed(2))
    m = labels != -100
    n = m.sum().item()
    as_mask = (out[m] == MASK).float().mean().item()
    unchanged = (out[m] == ids[m]).float().mean().item()
    replaced = 1 - as_mask - unchanged
    # a random replacement may equal the original (1/46): the "unchanged" share grows by ~0.1/46
    assert abs(as_mask - 0.8) < 0.01 and abs(unchanged - 0.1) < 0.01 and abs(replaced - 0.1) < 0.01, n
    assert not torch.isin(out[m], torch.tensor([0, 1, 2])).any()  # random ids are never special
    assert torch.equal(out[~m], ids[~m])
    assert torch.equal(labels[m], ids[m])


def test_all_mask():
    ids, att = big_batch(8, 128)
    out, labels = mask_for_mntp(ids, att, spec(0.8, "all_mask"), torch.Generator().manual_seed(3))
    m = labels != -100
    assert m.any() and (out[m] == MASK).all() and torch.equal(out[~m], ids[~m])


@pytest.mark.parametrize("side", ["right", "left"])
def test_never_masks_padding_specials_or_first_real_token(side):
    b, s, pad = 16, 12, 0
    lengths = torch.randint(2, s + 1, (b,), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(s)
    real = pos < lengths[:, None] if side == "right" else pos >= (s - lengths)[:, None]
    ids = torch.randint(4, V, (b, s), generator=torch.Generator().manual_seed(5))
    ids[:, 5] = 2  # a special id (e.g. EOS) in the middle of every row
    ids = ids.masked_fill(~real, pad)
    first_real = real.long().argmax(dim=1)
    _, labels = mask_for_mntp(ids, real.long(), spec(1.0), torch.Generator().manual_seed(6))
    m = labels != -100
    assert not m[~real].any()
    assert not m[ids == 2].any()
    assert not m[torch.arange(b), first_real].any()
    expected = real.clone()
    expected[torch.arange(b), first_real] = False
    expected &= ids != 2
    assert torch.equal(m, expected)  # with p=1 every other real token is a target


def test_deterministic_given_generator():
    ids, att = big_batch(4, 64)
    a = mask_for_mntp(ids, att, spec(), torch.Generator().manual_seed(7))
    b = mask_for_mntp(ids, att, spec(), torch.Generator().manual_seed(7))
    c = mask_for_mntp(ids, att, spec(), torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_resolve_mask_token():
    tok = build_tokenizer()  # byte-level BPE with <pad>/<s>/</s> and no mask token
    with pytest.raises(ValueError, match="no mask token.*underscore.*eos.*new"):
        resolve_mask_token(tok, "tokenizer")
    uid, added = resolve_mask_token(tok, "underscore")
    assert not added and tok.convert_ids_to_tokens(uid) == "_"
    assert resolve_mask_token(tok, "eos") == (tok.eos_token_id, False)
    assert resolve_mask_token(tok, "auto") == (uid, False)  # the default: no mask token here, so "_"

    n = len(tok)
    mid, added = resolve_mask_token(tok, "new")
    assert added and mid == n and len(tok) == n + 1
    assert tok("a <mask> b", add_special_tokens=False)["input_ids"].count(mid) == 1
    assert resolve_mask_token(tok, "tokenizer") == (mid, False)
    assert resolve_mask_token(tok, "auto") == (mid, False)  # now the tokenizer has one
    assert resolve_mask_token(tok, "new") == (mid, False)  # idempotent


def test_default_mask_token_works_for_the_shipped_model_and_is_checked_before_loading(tmp_path):
    """The default (auto) resolves for SmolLM2 (no mask token: "_"); a choice the tokenizer cannot
    honour is refused by the pre-flight, naming the stage, before any weight is read."""
    from transformers import AutoTokenizer

    from tests.helpers import save_tiny_decoder
    from toolkit.assets import resolve_model_path
    from toolkit.config import MNTPConfig, config_from_dict
    from toolkit.train import preflight

    smol = AutoTokenizer.from_pretrained(resolve_model_path("asset:smollm2-135m-instruct"))
    assert MNTPConfig().mask_token == "auto" and resolve_mask_token(smol, "auto") == (smol.convert_tokens_to_ids("_"), False)
    model = save_tiny_decoder(tmp_path / "m")
    (model / "model.safetensors").unlink()  # the check needs the tokenizer only
    cfg = config_from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": str(model)},
                            "stages": [{"name": "mntp", "steps": 1, "data": {"path": "unused"},
                                        "objective": {"kind": "mntp", "mntp": {"mask_token": "tokenizer"}}}]})
    with pytest.raises(ValueError, match=r"^stages\.mntp\.objective\.mntp\.mask_token=tokenizer: this tokenizer has "
                                         r"no mask token"):
        preflight(cfg, check_data=False)


def _word_tokenizer(model, pre_tokenizer):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(model)
    raw.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")


def test_resolve_underscore_must_be_one_known_token():
    from tokenizers import models, pre_tokenizers

    unknown = _word_tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"),
                              pre_tokenizers.Whitespace())
    with pytest.raises(ValueError, match="not a single token"):
        resolve_mask_token(unknown, "underscore")  # "_" -> <unk>: useless as a mask
    with pytest.raises(ValueError, match="no EOS"):
        resolve_mask_token(unknown, "eos")
    split = _word_tokenizer(models.BPE({"<unk>": 0, "\u2581": 1, "a": 2}, [], unk_token="<unk>"),
                            pre_tokenizers.Metaspace(prepend_scheme="always"))
    assert len(split.encode("_", add_special_tokens=False)) == 2  # "▁" + "_"
    with pytest.raises(ValueError, match="not a single token"):
        resolve_mask_token(split, "underscore")
