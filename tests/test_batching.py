"""Window batching (length bucketing, token budgets) and sequence packing."""

import numpy as np

from data_pipelines.batching import pack_sequences, window_batches


def test_length_bucketing_reduces_padding():
    lengths = list(np.random.default_rng(0).integers(1, 200, 400))
    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)
    bucketed = window_batches(lengths, 8, np.random.default_rng(1))
    plain = window_batches(lengths, 8, np.random.default_rng(1), sort=False)
    assert sorted(i for b in bucketed for i in b) == list(range(400))
    assert padded(bucketed) < 0.6 * padded(plain)
    assert [len(b) for b in bucketed] == [8] * 50


def test_remainder_is_dropped_and_order_is_seeded():
    a = window_batches(list(range(10)), 4, np.random.default_rng(5))
    assert sum(map(len, a)) == 8 and a == window_batches(list(range(10)), 4, np.random.default_rng(5))


def test_bucketing_and_token_budget():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47]
    batches = window_batches(lengths, 2, None)
    assert all(abs(lengths[a] - lengths[b]) <= 1 for a, b in batches)
    budget = window_batches(lengths, 8, None, max_tokens=100)
    assert all(len(b) * max(lengths[i] for i in b) <= 100 for b in budget)
    assert sorted(i for b in budget for i in b) == list(range(8))


def test_packing_keeps_sample_boundaries():
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    rows = pack_sequences(seqs, 5)
    for row in rows:
        assert len(row["input_ids"]) <= 5 and row["cu_seqlens"][-1] == len(row["input_ids"])
        for k, i in enumerate(row["samples"]):
            a, b = row["cu_seqlens"][k], row["cu_seqlens"][k + 1]
            assert row["input_ids"][a:b] == seqs[i] and row["position_ids"][a:b] == list(range(b - a))
    assert sorted(i for r in rows for i in r["samples"]) == [0, 1, 2, 3]
