"""GradCache must reproduce plain backprop: same loss, same parameter gradients, same dropout masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModel, LlamaConfig

from toolkit.objectives.contrastive import simcse_loss, supervised_contrastive_loss
from toolkit.objectives.gradcache import gradcache_backward

VOCAB, SEQ = 128, 6


class Embedder(nn.Module):
    """Tiny Llama + mean pooling (+ optional dropout on the pooled vector)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=64, vocab_size=VOCAB, attention_dropout=dropout)
        torch.manual_seed(0)
        self.model = AutoModel.from_config(cfg)
        self.dropout = nn.Dropout(dropout)

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return self.dropout((hidden * mask).sum(1) / mask.sum(1))


def make_batch(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(2, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ) < lengths[:, None]).long()  # right padding
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def simcse_setup(b: int):
    batch = make_batch(b, 1)
    return [batch, batch], lambda a, v: simcse_loss(a, v, 0.05)


def supervised_setup(b: int, k: int = 2):
    groups = [make_batch(b, 1), make_batch(b, 2), make_batch(b * k, 3)]
    return groups, lambda q, p, n: supervised_contrastive_loss(q, p, n.view(b, k, -1), 0.02)


def grads(model: nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def plain_step(embed, groups, loss_fn, chunk_size: int | None = None):
    """Plain backprop; with chunk_size, embed each group's chunks in sequence (GradCache's RNG order)."""
    def embed_group(g):
        n = g["input_ids"].shape[0]
        c = chunk_size or n
        return torch.cat([embed({k: v[i : i + c] for k, v in g.items()}) for i in range(0, n, c)])

    loss = loss_fn(*[embed_group(g) for g in groups])
    loss.backward()
    return loss.detach()


def checkpoint_on(embed: Embedder) -> None:
    embed.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert embed.model.is_activation_checkpointing


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-5):
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=atol, rtol=1e-4), (x - y).abs().max()


@pytest.mark.parametrize("setup", [simcse_setup, supervised_setup])
def test_matches_full_batch_without_dropout(setup):
    embed = Embedder()
    groups, loss_fn = setup(8)
    ref_loss = plain_step(embed, groups, loss_fn)
    ref = grads(embed)
    for chunk in (1, 3, 8):
        loss = gradcache_backward(embed, groups, loss_fn, chunk)
        assert torch.allclose(loss, ref_loss, atol=1e-6) and not loss.requires_grad
        assert_same(grads(embed), ref)
    gradcache_backward(embed, groups, loss_fn, 3, loss_scale=0.25)
    assert_same(grads(embed), [0.25 * g for g in ref])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_dropout_masks_are_replayed(checkpointing):
    embed = Embedder(dropout=0.1).train()
    groups, loss_fn = supervised_setup(6)

    torch.manual_seed(11)
    ref_loss = plain_step(embed, groups, loss_fn)
    ref = grads(embed)
    torch.manual_seed(12)
    other_loss = plain_step(embed, groups, loss_fn)
    grads(embed)
    assert not torch.allclose(ref_loss, other_loss)  # dropout really is on

    if checkpointing:  # non-reentrant checkpointing recomputes with its own RNG replay inside phase 3
        checkpoint_on(embed)
    torch.manual_seed(11)
    loss = gradcache_backward(embed, groups, loss_fn, chunk_size=18)  # one chunk per group
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert_same(grads(embed), ref, atol=1e-6)

    embed.model.activation_checkpointing_disable()
    torch.manual_seed(13)
    ref_loss = plain_step(embed, groups, loss_fn, chunk_size=4)
    ref = grads(embed)
    after_plain = torch.rand(3)
    if checkpointing:
        checkpoint_on(embed)
    torch.manual_seed(13)
    loss = gradcache_backward(embed, groups, loss_fn, chunk_size=4)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert_same(grads(embed), ref)
    assert torch.equal(torch.rand(3), after_plain)  # RNG left as after one pass over the chunks


def test_large_batch_small_chunks():
    embed = Embedder()
    groups, loss_fn = simcse_setup(512)
    ref_loss = plain_step(embed, groups, loss_fn)
    ref = grads(embed)
    loss = gradcache_backward(embed, groups, loss_fn, chunk_size=32)
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert_same(grads(embed), ref)


def test_rejects_bad_input():
    embed = Embedder()
    groups, loss_fn = simcse_setup(4)
    with pytest.raises(ValueError, match="chunk_size"):
        gradcache_backward(embed, groups, loss_fn, 0)
    bad = {"input_ids": groups[0]["input_ids"], "attention_mask": groups[0]["attention_mask"][:3]}
    with pytest.raises(ValueError, match="first dimension"):
        gradcache_backward(embed, [bad, bad], loss_fn, 2)
