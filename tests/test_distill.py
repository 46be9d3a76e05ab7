"""D2LLM losses against hand-computed references (plain loops and the papers' formulas), their
numerical stability, and the IEM's decomposed fast path against its plain form."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import save_tiny_decoder
from toolkit.config import ConfigError, D2LLMConfig
from toolkit.models.iem import InteractionEmulation
from toolkit.objectives.distill import (
    contrastive_imitation,
    d2llm_loss,
    feature_imitation,
    in_batch_infonce,
    pairwise_rank_imitation,
    pearson_rank_imitation,
)

B, K = 3, 2


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    z_cand = torch.randn(B, 1 + K, generator=g, dtype=torch.float64)
    s_cand = torch.rand(B, 1 + K, generator=g, dtype=torch.float64)
    z_inb = torch.randn(B, B, generator=g, dtype=torch.float64)
    s_inb = torch.rand(B, B, generator=g, dtype=torch.float64)
    return z_cand, s_cand, z_inb, s_inb


def test_in_batch_infonce(batch):
    _, _, z, _ = batch
    want = sum(-math.log(math.exp(z[i, i]) / sum(math.exp(z[i, j]) for j in range(B))) for i in range(B)) / B
    assert in_batch_infonce(z).item() == pytest.approx(want, rel=1e-6)
    assert in_batch_infonce(z, 0.5).item() == pytest.approx(in_batch_infonce(2 * z).item(), rel=1e-6)


def test_contrastive_imitation(batch):
    z, s, _, _ = batch
    want = 0.0
    for i in range(B):
        logits = [s[i, 0] * z[i, 0]] + [(1 - s[i, k]) * z[i, k] for k in range(1, 1 + K)]
        want += -math.log(math.exp(logits[0]) / sum(math.exp(x) for x in logits))
    assert contrastive_imitation(z, s).item() == pytest.approx(want / B, rel=1e-6)


def test_pearson_rank_imitation(batch):
    z, s, _, _ = batch
    want = 0.0
    for i in range(B):
        zi, si = z[i].tolist(), s[i].tolist()
        mz, ms = sum(zi) / len(zi), sum(si) / len(si)
        cov = sum((a - mz) * (b - ms) for a, b in zip(zi, si))
        r = cov / math.sqrt(sum((a - mz) ** 2 for a in zi) * sum((b - ms) ** 2 for b in si))
        want += 1 - r
    assert pearson_rank_imitation(z, s).item() == pytest.approx(want / B, rel=1e-6)
    assert pearson_rank_imitation(s * 3 + 1, s).item() == pytest.approx(0.0, abs=1e-7)  # same ranking: 0


def test_pairwise_rank_imitation(batch):
    z, s, zi, si = (x.tolist() for x in batch)
    terms = []
    for i in range(B):
        for k in range(1, 1 + K):
            for j in range(B):
                if j != i:
                    w = max(0.0, s[i][k] - si[i][j])
                    terms.append(w * -math.log(1 / (1 + math.exp(-(z[i][k] - zi[i][j])))))
    assert pairwise_rank_imitation(*batch).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_pairwise_rank_imitation_over_known_teacher_pairs_only(batch):
    """A batch mixing the teacher's planned groups knows s_ij only within a group."""
    known = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    z, s, zi, si = (x.tolist() for x in batch)
    terms = [max(0.0, s[i][k] - si[i][j]) * -math.log(1 / (1 + math.exp(-(z[i][k] - zi[i][j]))))
             for i in range(B) for k in range(1, 1 + K) for j in range(B) if j != i and known[i, j]]
    assert pairwise_rank_imitation(*batch, known).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    nothing = pairwise_rank_imitation(*batch, torch.zeros(B, B, dtype=torch.bool))
    assert nothing.item() == 0.0


def test_feature_imitation():
    g = torch.Generator().manual_seed(1)
    h, t = torch.randn(B, 1 + K, 5, generator=g), torch.randn(B, 1 + K, 7, generator=g)
    want = 0.0
    for i in range(B):
        for a in range(1 + K):
            for b in range(1 + K):
                ch = torch.nn.functional.cosine_similarity(h[i, a], h[i, b], dim=0)
                ct = torch.nn.functional.cosine_similarity(t[i, a], t[i, b], dim=0)
                want += float(ch - ct) ** 2
    assert feature_imitation(h, t).item() == pytest.approx(want / B, rel=1e-5)
    assert feature_imitation(h, h * 2).item() == pytest.approx(0.0, abs=1e-6)


def test_total_is_the_weighted_sum_and_missing_inputs_fail(batch):
    z, s, zi, si = batch
    h, t = torch.randn(B, 1 + K, 4), torch.randn(B, 1 + K, 6)
    w = D2LLMConfig(in_batch=1.0, contrastive=2.0, rank_pearson=0.5, rank_pairwise=0.1, feature=0.01)
    total, parts = d2llm_loss(z, s, zi, si, w, h, t)
    want = (in_batch_infonce(zi) + 2 * contrastive_imitation(z, s) + 0.5 * pearson_rank_imitation(z, s)
            + 0.1 * pairwise_rank_imitation(z, s, zi, si) + 0.01 * feature_imitation(h, t))
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert set(parts) == {"in_batch", "contrastive", "rank_pearson", "rank_pairwise", "feature"}
    with pytest.raises(ValueError, match="teacher features"):
        d2llm_loss(z, s, zi, si, w)
    with pytest.raises(ValueError, match="in-batch scores"):
        d2llm_loss(z, s, zi, None, D2LLMConfig(feature=0.0))
    total, parts = d2llm_loss(z, s, zi, None, D2LLMConfig(rank_pairwise=0.0, feature=0.0))
    assert set(parts) == {"in_batch", "contrastive", "rank_pearson"}


def test_losses_are_stable_for_huge_logits(batch):
    z, s, zi, si = batch
    big = 1e4
    for value in (in_batch_infonce(zi * big), contrastive_imitation(z * big, s),
                  pairwise_rank_imitation(z * big, s, zi * big, si)):
        assert torch.isfinite(value)
    z = (z * big).requires_grad_()
    contrastive_imitation(z, s).backward()
    assert torch.isfinite(z.grad).all()


def test_iem_fast_path_equals_plain_form():
    torch.manual_seed(0)
    iem = InteractionEmulation(embed_dim=16, hidden=32).double()
    yq, yp = torch.randn(4, 16, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64)
    for symmetric in (False, True):
        z_fast, h_fast = iem.score_proj(iem.query_proj(yq)[:, None], iem.passage_proj(yp)[None], symmetric)
        for i in range(4):
            for j in range(6):
                w1 = torch.cat([iem.w1_query.weight, iem.w1_passage.weight], dim=1)  # W1 = [W1a | W1b]
                x = torch.relu(w1 @ torch.cat([yq[i], yp[j]]) + iem.w1_query.bias)
                h = torch.relu((iem.sym if symmetric else iem.asym)(x))
                assert torch.allclose(h_fast[i, j], h) and torch.allclose(z_fast[i, j], iem.out(h)[0])
    flags = torch.tensor([[True], [False], [True], [False]])  # per-query branch choice
    z_mixed, _ = iem(yq[:, None], yp[None], flags)
    assert torch.allclose(z_mixed[0], iem(yq[:1, None], yp[None], True)[0][0])
    assert torch.allclose(z_mixed[1], iem(yq[1:2, None], yp[None], False)[0][0])
    assert InteractionEmulation(4096, 512).flops_per_pair() == pytest.approx(0.5e6, rel=0.06)  # METHODS 2.2


def test_iem_cosine_skip_adds_scaled_cosine_in_both_forms(tmp_path):
    """d2llm.cosine_scale c: z = the paper's IEM score + c cos(y_q, y_p), the same through the decomposed
    projections (the passage side precomputable); the folder records it and loads it back."""
    torch.manual_seed(0)
    plain = InteractionEmulation(embed_dim=16, hidden=32).double()
    skip = InteractionEmulation(embed_dim=16, hidden=32, cosine_scale=20.0).double()
    skip.load_state_dict(plain.state_dict())  # same weights: the skip adds no parameter
    yq, yp = torch.randn(4, 16, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(yq[:, None], yp[None], dim=-1)
    z_plain, h_plain = plain(yq[:, None], yp[None])
    z_skip, h_skip = skip(yq[:, None], yp[None])
    assert torch.allclose(z_skip, z_plain + 20.0 * cos) and torch.equal(h_skip, h_plain)
    u_p = skip.passage_proj(yp)
    assert u_p.shape == (6, 32 + 16)  # the hidden units, then the unit embedding
    z_fast, _ = skip.score_proj(skip.query_proj(yq)[:, None], u_p[None], False)
    assert torch.allclose(z_fast, z_skip)
    assert skip.flops_per_pair() == plain.flops_per_pair() + 2 * 16 + 1

    from toolkit.config import ModelConfig, PoolingConfig
    from toolkit.models.encoder import Encoder
    from toolkit.models.loading import build_encoder

    encoder, _ = build_encoder(ModelConfig(path=str(save_tiny_decoder(tmp_path / "decoder")), max_length=32),
                               PoolingConfig())
    encoder.add_iem(8, 5.0)
    with pytest.raises(ConfigError, match="d2llm.cosine_scale=0, but this encoder's IEM has 5"):
        encoder.add_iem(8, 0.0)
    loaded = Encoder.from_pretrained(encoder.save_pretrained(tmp_path / "student"))
    assert loaded.iem.cosine_scale == 5.0 and loaded.spec.iem_cosine_scale == 5.0
    texts = ["a cat", "the dog barks"]
    y = torch.from_numpy(loaded.encode(texts, normalize=False))
    assert torch.allclose(loaded.iem(y[:1], y)[0], encoder.iem(y[:1], y)[0])
    with pytest.raises(ConfigError, match="d2llm.cosine_scale: must be >= 0"):
        D2LLMConfig(cosine_scale=-1.0)


def test_d2llm_stages_of_one_run_share_one_iem_shape():
    from toolkit.config import config_from_dict

    def stage(name, **d2llm):
        return {"name": name, "objective": {"kind": "d2llm", "d2llm": d2llm}, "data": {"path": "d"}, "steps": 1}

    run = {"output_dir": "x", "model": {"path": "m"}}
    with pytest.raises(ConfigError, match=r"a \(iem_hidden 512, cosine_scale 20\), b \(iem_hidden 512, cosine_scale 0\) "
                                          "train one IEM"):
        config_from_dict({**run, "stages": [stage("a", cosine_scale=20.0), stage("b")]})
    assert len(config_from_dict({**run, "stages": [stage("a", cosine_scale=20.0), stage("b", cosine_scale=20.0)]}).stages) == 2


def test_d2llm_config_needs_two_queries_for_in_batch_terms():
    from toolkit.config import ConfigError, config_from_dict

    stage = {"name": "distill", "steps": 1, "objective": {"kind": "d2llm"}, "data": {"path": "d", "batch_size": 1}}
    with pytest.raises(ConfigError, match=r"stages\.distill\.data\.batch_size"):
        config_from_dict({"output_dir": "x", "model": {"path": "m"}, "stages": [stage]})
    stage["objective"]["d2llm"] = {"in_batch": 0.0, "rank_pairwise": 0.0}
    assert config_from_dict({"output_dir": "x", "model": {"path": "m"}, "stages": [stage]}).stages[0].data.batch_size == 1
    with pytest.raises(ConfigError, match="must be >= 0 and not all 0"):
        D2LLMConfig(in_batch=0, contrastive=0, rank_pearson=0, rank_pairwise=0, feature=0)
