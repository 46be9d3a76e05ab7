"""Local evaluation tasks: fixed held-out splits, disjoint from training pairs, sane scores."""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest

from toolkit.asset_splits import (
    rt_is_heldout,
    stable_hash,
    wordnet_document,
    wordnet_family,
    wordnet_is_heldout,
    wordnet_training_pairs,
)
from toolkit.errors import InputError
from toolkit.eval.local_tasks import TASKS, evaluate_tasks, get_task, retrieval_metrics

SMALL = {"rt-sentiment": {"n_train": 300, "n_test": 300}, "wordnet-retrieval": {"n_queries": 300}}


def random_encoder(texts, instruction=None):
    """Text-keyed random vectors: deterministic, carries no meaning."""
    out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(64) for t in texts])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def bow_encoder(texts, instruction=None):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=2**14, alternate_sign=False, norm="l2").transform(texts).toarray()


def test_stable_hash_is_fixed_across_processes():
    assert stable_hash("rt", "about_a_boy") == stable_hash("rt", "about_a_boy")
    assert stable_hash("x") == 5569581137042363637  # a changed value means every split moved


def test_registry_and_errors():
    assert set(TASKS) == {"rt-sentiment", "wordnet-retrieval"}
    for name in TASKS:
        task = get_task(name)
        assert task.name == name and task.main_metric and task.instruction_query
    with pytest.raises(InputError, match="known: \\['rt-sentiment', 'wordnet-retrieval'\\]"):
        get_task("mteb-everything")


def test_retrieval_metrics():
    perfect = retrieval_metrics(np.eye(4), np.arange(4))
    assert perfect == {"ndcg@10": 1.0, "mrr@10": 1.0, "recall@10": 1.0}
    constant = retrieval_metrics(np.ones((20, 20)), np.arange(20))  # ties rank against the query
    assert constant["recall@10"] == 0.0
    second = retrieval_metrics(np.array([[0.5, 0.9]]), np.array([0]))
    assert second["mrr@10"] == 0.5 and abs(second["ndcg@10"] - 1 / np.log2(3)) < 1e-9


def test_rt_split_deterministic_balanced_and_by_movie():
    task = get_task("rt-sentiment")
    train, test = task.splits()
    assert (train, test) == get_task("rt-sentiment").splits()
    assert (len(train), len(test)) == (1000, 500)
    assert sum(r[1] for r in train) == 500 and sum(r[1] for r in test) == 250
    assert not {r[2] for r in train} & {r[2] for r in test}  # no movie on both sides
    assert all(rt_is_heldout(r[2]) for r in test) and not any(rt_is_heldout(r[2]) for r in train)
    assert not {r[0] for r in train} & {r[0] for r in test}


def test_wordnet_eval_split_deterministic_and_hard():
    task = get_task("wordnet-retrieval")
    synsets = task.synsets()
    assert synsets == get_task("wordnet-retrieval").synsets() and len(synsets) == 600
    assert all(wordnet_is_heldout(s) and s.examples for s in synsets)
    families = {}
    for s in synsets:
        families.setdefault(wordnet_family(s), []).append(s)
    assert all(len(m) >= 2 for m in families.values())  # every query competes with its siblings
    assert len({wordnet_document(s) for s in synsets}) == len(synsets)  # one relevant doc per query


def test_training_pairs_never_touch_heldout_synsets():
    pairs = wordnet_training_pairs()
    assert len(pairs) > 10_000 and pairs == wordnet_training_pairs()
    assert wordnet_training_pairs(50) == pairs[:50]
    assert {"query", "positive", "negative", "instruction", "task", "id"} <= set(pairs[0])
    held = get_task("wordnet-retrieval", n_queries=10_000, max_family=10_000).synsets()  # the whole held-out pool
    held_ids = {f"wordnet:{s.pos}:{s.offset}" for s in held}
    held_texts = {s.definition for s in held} | {wordnet_document(s) for s in held}
    assert not held_ids & {p["id"] for p in pairs}
    assert not held_texts & {p[f] for p in pairs for f in ("query", "positive", "negative")}
    assert all(p["positive"] != p["negative"] for p in pairs)


def test_random_and_bow_encoders_give_sane_scores():
    results = {name: get_task(name, **SMALL[name]).evaluate(random_encoder) for name in TASKS}
    assert 0.35 < results["rt-sentiment"]["accuracy"] < 0.65  # balanced classes: chance = 0.5
    assert results["wordnet-retrieval"]["ndcg@10"] < 0.1  # chance ~ 0.01 with 300 docs
    bow = get_task("wordnet-retrieval", **SMALL["wordnet-retrieval"]).evaluate(bow_encoder)
    assert results["wordnet-retrieval"]["ndcg@10"] < bow["ndcg@10"] < 0.3  # overlap helps, but not much


def test_encoder_output_is_checked():
    with pytest.raises(ValueError, match="encode returned shape"):
        get_task("wordnet-retrieval", n_queries=20).evaluate(lambda texts, instruction: np.ones((3, 4)))


@pytest.mark.slow
def test_minilm_baseline_beats_random():
    from toolkit.eval.baselines import minilm_encoder

    encode = minilm_encoder()
    rand = evaluate_tasks(random_encoder)
    for name in TASKS:
        t0 = time.perf_counter()
        scores = get_task(name).evaluate(encode)
        metric = get_task(name).main_metric
        print(f"\n{name}: MiniLM {scores} ({time.perf_counter() - t0:.1f} s); random {rand[name][metric]:.4f}")
        assert scores[metric] > rand[name][metric] + 0.1
