"""Pooling heads against hand-computed references; the embed mask keeps instructions out."""

import pytest
import torch

from toolkit.config import PoolingConfig
from toolkit.models.pooling import Pooling, exclude_prefix

torch.manual_seed(0)
H = torch.randn(2, 5, 8)
# row 0: right padded, 4 real tokens; row 1: left padded, 3 real tokens
ATT = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]])


def pool(mode, embed_mask=ATT, **kw):
    return Pooling(PoolingConfig(mode=mode, **kw), 8)(H, ATT, embed_mask)


def test_exclude_prefix_left_and_right_padding():
    assert exclude_prefix(ATT, 2).tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    assert exclude_prefix(ATT, 0).tolist() == ATT.tolist()


def test_mean_and_embed_mask():
    out = pool("mean")
    assert torch.allclose(out[0], H[0, :4].mean(0), atol=1e-6)
    assert torch.allclose(out[1], H[1, 2:].mean(0), atol=1e-6)
    out = pool("mean", exclude_prefix(ATT, 1))
    assert torch.allclose(out[0], H[0, 1:4].mean(0), atol=1e-6)
    assert torch.allclose(out[1], H[1, 3:].mean(0), atol=1e-6)


def test_weighted_mean_weights_pooled_positions():
    out = pool("weighted_mean", exclude_prefix(ATT, 1))
    ref0 = (1 * H[0, 1] + 2 * H[0, 2] + 3 * H[0, 3]) / 6
    ref1 = (1 * H[1, 3] + 2 * H[1, 4]) / 3
    assert torch.allclose(out[0], ref0, atol=1e-6) and torch.allclose(out[1], ref1, atol=1e-6)


def test_last_and_bos():
    out = pool("last")
    assert torch.equal(out[0], H[0, 3]) and torch.equal(out[1], H[1, 4])
    out = pool("bos", exclude_prefix(ATT, 1))  # BOS is the first real token, instruction or not
    assert torch.equal(out[0], H[0, 0]) and torch.equal(out[1], H[1, 2])


def test_pma_matches_manual_multihead_with_per_head_scaling():
    p = Pooling(PoolingConfig(mode="pma", heads=2), 8)
    head = p.head
    out = p(H, ATT, ATT)
    # manual reference for row 1 (3 real tokens), per-head scale sqrt(d/H) = 2
    x = H[1, 2:]
    s = head.seeds
    q, k, v = head.q_proj(s), head.k_proj(x), head.v_proj(x)
    outs = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        a = torch.softmax(q[:, sl] @ k[:, sl].T / 2.0, dim=-1)
        outs.append(a @ v[:, sl])
    o = s + torch.cat(outs, -1)
    h1 = head.norm1(o)
    y = head.norm2(h1 + torch.relu(head.ffn(h1)))
    assert torch.allclose(out[1], y.reshape(-1), atol=1e-5)
    # padding never influences the result
    H2 = H.clone()
    H2[1, :2] = 1e3
    assert torch.allclose(p(H2, ATT, ATT)[1], out[1], atol=1e-5)


def test_latent_attention_shape_and_mask():
    p = Pooling(PoolingConfig(mode="latent_attention", heads=2, num_latents=16), 8)
    out = p(H, ATT, ATT)
    assert out.shape == (2, 8)
    H2 = H.clone()
    H2[0, 4] = 1e3  # a padded position
    assert torch.allclose(p(H2, ATT, ATT), out, atol=1e-6)


def test_empty_pooling_mask_is_a_clear_error():
    with pytest.raises(ValueError, match="no poolable token"):
        pool("mean", exclude_prefix(ATT, 4))
