"""The D2LLM quickstart's measurements: ranking metrics and rank correlation against hand-computed
values, and the held-out evaluation set built from WordNet's held-out families only."""

from __future__ import annotations

import numpy as np
import pytest

from launchers.d2llm_quickstart import _heldout, _random_ranking, _ranking, _spearman


def test_ranking_metrics_column_zero_is_relevant():
    scores = np.array([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [2.0, 2.0, 0.0]])  # ranks 1, 3, 2 (tie counts against)
    m = _ranking(scores)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert m["ndcg"] == pytest.approx((1 + 1 / np.log2(4) + 1 / np.log2(3)) / 3)
    assert m["top1"] == pytest.approx(1 / 3)
    rr = np.array([1, 1 / 3, 1 / 2])
    assert m["mrr_se"] == pytest.approx(rr.std(ddof=1) / np.sqrt(3))


def test_random_order_expectation():
    r = _random_ranking(64, 8)
    assert r["mrr"] == pytest.approx(sum(1 / k for k in range(1, 9)) / 8)  # 0.3397: the README's "34.0"
    assert r["top1"] == pytest.approx(1 / 8) and r["top1_se"] == pytest.approx(np.sqrt(1 / 8 * 7 / 8) / 8)


def test_spearman_per_query_mean():
    a = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    assert _spearman(a, a) == pytest.approx(1.0)
    assert _spearman(a, a[:, ::-1]) == pytest.approx(-1.0)
    b = np.array([[1.0, 3.0, 2.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    assert _spearman(a, b) == pytest.approx((1 - 6 * 2 / (4 * 15) + 1) / 2)  # 1 - 6 sum d^2 / n(n^2 - 1)


def test_heldout_candidates():
    from toolkit.asset_splits import wordnet_training_pairs

    evalset = _heldout(12, 5)
    assert len(evalset) == 12 and all(len(e["candidates"]) == 5 for e in evalset)
    assert all(len(set(e["candidates"])) == 5 for e in evalset)
    train_texts = {t for p in wordnet_training_pairs() for t in (p["query"], p["positive"])}
    assert not any(e["query"] in train_texts or e["candidates"][0] in train_texts for e in evalset)
