"""Hard-negative mining: for each (query, positive) of a pair dataset, the top-k passages of a corpus
by BM25 or by a dense encoder, the positive itself excluded, written as a new pair dataset.

The corpus is a text dataset, or (by default) every positive and negative of the input. Dense mining
takes the encoder as a function (`encode(texts, instruction) -> normalised embeddings`, e.g. a bound
`Encoder.encode`): the data layer knows no model code. Mined
negatives replace (or, with `keep_existing`, follow, never repeating) the input's; a query whose corpus holds fewer
than k other passages keeps what there is, so its sample has fewer negatives (the writer groups
samples by task only, so supervised / D2LLM batches must then share a count: mine with k below the
corpus size).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data_pipelines.manifest import Manifest, load_manifest
from data_pipelines.stream import DataError, ReadStats, read_shard
from data_pipelines.writer import build_shards
from toolkit.errors import InputError

_WORD = re.compile(r"\w+", re.UNICODE)
EncodeFn = Callable[[list[str], "str | None"], np.ndarray]  # texts, instruction -> [n, dim], L2-normalised


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 over a fixed corpus (k1, b as in Robertson et al.; idf = log(1 + (N - n + .5) / (n + .5)))."""

    def __init__(self, corpus: Sequence[str], k1: float = 1.5, b: float = 0.75):
        from scipy.sparse import csr_matrix

        docs = [Counter(words(t)) for t in corpus]
        vocab: dict[str, int] = {}
        rows, cols, tfs = [], [], []
        for d, counts in enumerate(docs):
            for w, tf in counts.items():
                rows.append(d)
                cols.append(vocab.setdefault(w, len(vocab)))
                tfs.append(tf)
        lengths = np.array([sum(c.values()) for c in docs], dtype=np.float64)
        avg = lengths.mean() if len(lengths) and lengths.mean() > 0 else 1.0
        df = np.bincount(np.array(cols, dtype=np.int64), minlength=len(vocab)) if cols else np.zeros(0)
        idf = np.log(1.0 + (len(docs) - df + 0.5) / (df + 0.5))
        tf = np.array(tfs, dtype=np.float64)
        norm = k1 * (1 - b + b * lengths[np.array(rows, dtype=np.int64)] / avg) if rows else np.zeros(0)
        weights = idf[np.array(cols, dtype=np.int64)] * tf * (k1 + 1) / (tf + norm) if rows else np.zeros(0)
        self.vocab = vocab
        self.matrix = csr_matrix((weights, (rows, cols)), shape=(len(docs), len(vocab)))  # [docs, terms]

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """[len(queries), len(corpus)]: a query term counts once per occurrence in the query."""
        from scipy.sparse import csr_matrix

        rows, cols, vals = [], [], []
        for q, text in enumerate(queries):
            for w, n in Counter(words(text)).items():
                if w in self.vocab:
                    rows.append(q)
                    cols.append(self.vocab[w])
                    vals.append(float(n))
        query = csr_matrix((vals, (rows, cols)), shape=(len(queries), len(self.vocab)))
        return np.asarray((query @ self.matrix.T).todense())


def top_k_excluding(scores: np.ndarray, corpus: Sequence[str], positives: Sequence[str], k: int,
                    exclude: Sequence[Sequence[str]] | None = None) -> list[list[int]]:
    """Per row, the indices of the k best-scoring passages that are neither the row's positive text nor
    one of its `exclude` texts (negatives it already has)."""
    out = []
    for r, (row, positive) in enumerate(zip(scores, positives)):
        banned = {positive.strip(), *(t.strip() for t in (exclude[r] if exclude else ()))}
        picked = []
        for i in np.argsort(-row, kind="stable"):
            if corpus[i].strip() not in banned:
                picked.append(int(i))
                if len(picked) == k:
                    break
        out.append(picked)
    return out


def mine(input_dir: str, output_dir: str, *, method: str, k: int, corpus_dir: str | None = None,
         encode: EncodeFn | None = None, keep_existing: bool = False, overwrite: bool = False) -> Manifest:
    """Mine k hard negatives per sample of the pair dataset `input_dir` into `output_dir`.

    `method="dense"` ranks by `encode(queries, instruction) @ encode(corpus, None).T`."""
    if k < 1:
        raise InputError(f"data mine: --k must be >= 1, got {k}")
    if method not in ("bm25", "dense"):
        raise InputError(f"data mine: --method must be bm25 or dense, got {method!r}")
    if method == "dense" and encode is None:
        raise InputError("data mine --method dense needs --encoder (an encoder folder)")
    samples = _read(load_manifest(input_dir), "pair", input_dir)
    if corpus_dir:
        corpus = [s["text"] for s in _read(load_manifest(corpus_dir), "text", corpus_dir)]
    else:
        corpus = list(dict.fromkeys(t for s in samples for t in (s["positive"], *s["negatives"])))
    if not corpus:
        raise InputError(f"{corpus_dir or input_dir}: the corpus to mine from is empty")
    by_task: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_task.setdefault((s["task"], s["instruction"] or ""), []).append(i)
    mined: list[list[int]] = [[] for _ in samples]
    if method == "bm25":
        index = BM25(corpus)
    else:
        passages = np.asarray(encode(corpus, None))  # once, for every task
    for (task, instruction), rows in by_task.items():
        for start in range(0, len(rows), 1024):  # bounded [queries, corpus] score blocks
            chunk = rows[start : start + 1024]
            queries = [samples[i]["query"] for i in chunk]
            if method == "bm25":
                scores = index.scores(queries)
            else:
                scores = np.asarray(encode(queries, instruction or None)) @ passages.T
            existing = [samples[i]["negatives"] for i in chunk] if keep_existing else None
            picks = top_k_excluding(scores, corpus, [samples[i]["positive"] for i in chunk], k, existing)
            for i, picked in zip(chunk, picks):
                mined[i] = picked
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "mined.jsonl"
        with src.open("w", encoding="utf-8") as fh:
            for s, picked in zip(samples, mined):
                negatives = (list(s["negatives"]) if keep_existing else []) + [corpus[i] for i in picked]
                record = {"id": s["id"], "query": s["query"], "positive": s["positive"], "negatives": negatives,
                          "instruction": s["instruction"], "task": s["task"]}
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        return build_shards([str(src)], output_dir, "pair", overwrite=overwrite)


def _read(manifest: Manifest, kind: str, where: str) -> list[dict]:
    if manifest.kind != kind and not (kind == "pair" and manifest.kind == "scored"):
        raise InputError(f"{where}: holds {manifest.kind} samples, expected {kind}")
    stats = ReadStats()
    out = [s for shard in manifest.shards for s in read_shard(manifest.shard_url(shard), shard, manifest.kind, stats)]
    if stats.num_bad:
        raise DataError(f"{where}: {stats.num_bad} bad records ({stats.bad}); `embedforge data verify {where}`")
    return out

