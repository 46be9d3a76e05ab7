"""Hard-negative mining: BM25 scores equal a direct implementation of the formula, the positive is
never its own negative, dense mining ranks by the encoder's cosine, and `embedforge data mine`
writes a pair dataset the trainer reads."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.manifest import load_manifest
from data_pipelines.mining import BM25, top_k_excluding, words
from data_pipelines.stream import ReadStats, read_shard
from data_pipelines.writer import build_shards
from tests.helpers import CORPUS, EMBEDFORGE

DOCS = ["the cat sat on the mat", "a dog runs in the park", "the cat and the dog play", "vectors of text",
        "machine learning of text vectors", "the park is green"]


def bm25_reference(query: str, docs: list[str], k1: float = 1.5, b: float = 0.75) -> list[float]:
    tokenised = [words(d) for d in docs]
    avg = sum(len(t) for t in tokenised) / len(tokenised)
    out = []
    for t in tokenised:
        score = 0.0
        for w in words(query):
            df = sum(w in d for d in tokenised)
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
            tf = t.count(w)
            score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(t) / avg))
        out.append(score)
    return out


def test_bm25_matches_the_formula():
    index = BM25(DOCS)
    for query in ("cat on the mat", "dog park park", "text vectors learning", "unknown words only"):
        assert np.allclose(index.scores([query])[0], bm25_reference(query, DOCS))


def test_positive_is_excluded_and_order_kept():
    scores = np.array([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    assert top_k_excluding(scores, DOCS, [DOCS[0]], 3) == [[1, 2, 3]]
    assert top_k_excluding(scores, DOCS, [" " + DOCS[1] + " "], 2) == [[0, 2]]
    assert top_k_excluding(scores, DOCS, [DOCS[0]], 2, exclude=[[DOCS[1]]]) == [[2, 3]]  # kept negatives not repeated


@pytest.fixture
def pair_dataset(tmp_path) -> Path:
    rows = [{"id": f"q{i}", "query": CORPUS[i], "positive": CORPUS[(i + 1) % 8], "task": "t"} for i in range(8)]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_shards([str(src)], tmp_path / "pairs", "pair")
    return tmp_path / "pairs"


def read(folder: Path) -> list[dict]:
    m = load_manifest(folder)
    return [s for shard in m.shards for s in read_shard(m.shard_url(shard), shard, m.kind, ReadStats())]


def test_cli_bm25_and_dense(pair_dataset, tmp_path, tiny_llama_dir):
    out = tmp_path / "mined"
    r = subprocess.run([EMBEDFORGE, "data", "mine", "--input", str(pair_dataset), "--output", str(out), "--k", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    samples = read(out)
    corpus = list(dict.fromkeys(CORPUS[(i + 1) % 8] for i in range(8)))
    index = BM25(corpus)
    for s in samples:
        assert len(s["negatives"]) == 2 and s["positive"] not in s["negatives"]
        want = top_k_excluding(index.scores([s["query"]]), corpus, [s["positive"]], 2)[0]
        assert s["negatives"] == [corpus[i] for i in want]

    from toolkit.config import ModelConfig, PoolingConfig
    from toolkit.models.encoder import Encoder
    from toolkit.models.loading import build_encoder

    encoder, _ = build_encoder(ModelConfig(path=str(tiny_llama_dir)), PoolingConfig())
    encoder.save_pretrained(tmp_path / "encoder")
    dense = tmp_path / "dense"
    r = subprocess.run([EMBEDFORGE, "data", "mine", "--input", str(pair_dataset), "--output", str(dense), "--k", "3",
                        "--method", "dense", "--encoder", str(tmp_path / "encoder")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    enc = Encoder.from_pretrained(tmp_path / "encoder")
    for s in read(dense):
        sims = enc.encode([s["query"]]) @ enc.encode(corpus).T
        order = [corpus[i] for i in np.argsort(-sims[0], kind="stable") if corpus[i] != s["positive"]][:3]
        assert s["negatives"] == order

    bad = subprocess.run([EMBEDFORGE, "data", "mine", "--input", str(pair_dataset), "--output", str(tmp_path / "x"),
                          "--method", "dense"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "needs --encoder" in bad.stderr
