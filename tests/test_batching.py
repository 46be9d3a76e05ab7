"""Batch plans: deterministic per (seed, epoch), resumable, bucketed, homogeneous by task."""

import numpy as np
import pytest

from data_pipelines.batching import BatchPlan, LoaderState


def take(it, n):
    return [next(it) for _ in range(n)]


def test_resume_continues_with_identical_batches():
    plan = BatchPlan(4, seed=7, lengths=list(np.random.default_rng(0).integers(1, 50, 30)))
    full = [b.tolist() for b, _ in take(plan.iterate(LoaderState()), 20)]  # crosses epochs (7 per epoch)
    first = take(plan.iterate(LoaderState()), 9)
    state = first[-1][1]
    rest = [b.tolist() for b, _ in take(plan.iterate(state), 11)]
    assert [b.tolist() for b, _ in first] + rest == full
    assert state.epoch == 1


def test_length_bucketing_reduces_padding():
    lengths = list(np.random.default_rng(1).integers(1, 200, 400))
    def waste(plan):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plan.epoch_batches(0))
    bucketed = BatchPlan(8, seed=0, lengths=lengths)
    plain = BatchPlan(8, seed=0, num_samples=400)
    assert waste(bucketed) < 0.3 * waste(plain)


def test_homogeneous_tasks_drop_incomplete():
    tasks = ["a"] * 10 + ["b"] * 7
    plan = BatchPlan(4, seed=0, tasks=tasks)
    batches = plan.epoch_batches(0)
    assert len(batches) == 2 + 1
    for b in batches:
        assert len({tasks[i] for i in b}) == 1 and len(b) == 4


def test_too_few_samples():
    with pytest.raises(ValueError, match="no full batch"):
        BatchPlan(8, seed=0, num_samples=5)
