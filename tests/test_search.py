"""D2LLM search: an index of precomputed passage embeddings and IEM projections; rerank over the full
first stage equals the scan, and every score is the IEM's plain-form logit of (query, passage)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import CORPUS, EMBEDFORGE

PASSAGES = list(dict.fromkeys(CORPUS))  # 8 distinct sentences


@pytest.fixture(scope="module", params=[0.0, 20.0], ids=["paper-iem", "cosine-skip"])
def student(tiny_llama_dir, tmp_path_factory, request) -> Path:
    """A student with the paper's IEM, and one with the cosine skip (d2llm.cosine_scale: its index
    stores W1b y_p only and takes the unit embedding from the stored embeddings)."""
    from toolkit.config import ModelConfig, PoolingConfig
    from toolkit.models.loading import build_encoder

    encoder, _ = build_encoder(ModelConfig(path=str(tiny_llama_dir)), PoolingConfig(mode="pma", heads=2))
    torch.manual_seed(1)
    encoder.add_iem(16, request.param)
    path = tmp_path_factory.mktemp("student") / "student"
    encoder.save_pretrained(path)
    return path


def test_rerank_equals_scan_and_scores_are_the_iem_logits(student, tmp_path):
    from toolkit.models.encoder import Encoder
    from toolkit.search.index import SearchIndex, build_index

    build_index(student, PASSAGES, tmp_path / "index", ids=[f"d{i}" for i in range(len(PASSAGES))])
    index = SearchIndex(tmp_path / "index")
    queries = ["a cat on a mat", "questions about retrieval"]
    scan = index.search(queries, k=5, mode="scan", block=3)
    full = index.search(queries, k=5, mode="rerank", first_stage=len(PASSAGES))
    assert [[h.id for h in r] for r in scan] == [[h.id for h in r] for r in full]
    enc = Encoder.from_pretrained(student)
    y_q = torch.from_numpy(enc.encode(queries, normalize=False))
    y_p = torch.from_numpy(enc.encode(PASSAGES, normalize=False))
    with torch.no_grad():
        z, _ = enc.iem(y_q[:, None], y_p[None])  # the plain form: W1 [y_q ; y_p]
    for qi, hits in enumerate(scan):
        want = torch.topk(z[qi], 5)
        assert [h.id for h in hits] == [f"d{int(i)}" for i in want.indices]
        assert np.allclose([h.score for h in hits], want.values.numpy(), atol=1e-5)
    few = index.search(queries, k=2, mode="rerank", first_stage=3)  # IEM over the first stage's 3 only
    assert all(len(r) == 2 for r in few)
    with pytest.raises(ValueError, match="rerank or scan"):
        index.search(queries, mode="exact")


def test_cli_index_and_query(student, tmp_path, tiny_llama_dir):
    passages = tmp_path / "passages.jsonl"
    passages.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(PASSAGES)))
    r = subprocess.run([EMBEDFORGE, "search", "index", "--model", str(student), "--passages", str(passages),
                        "--output", str(tmp_path / "idx")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "indexed 8 passages" in r.stdout, r.stderr[-2000:]
    q = subprocess.run([EMBEDFORGE, "search", "query", "--index", str(tmp_path / "idx"), "--query", "the dog",
                        "--query", "vectors", "--k", "3"], capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-2000:]
    lines = [json.loads(line) for line in q.stdout.splitlines()]
    assert [x["query"] for x in lines] == ["the dog", "vectors"] and all(len(x["hits"]) == 3 for x in lines)
    assert all(h["id"].startswith("p") for x in lines for h in x["hits"])

    from toolkit.config import ModelConfig, PoolingConfig
    from toolkit.models.loading import build_encoder

    plain, _ = build_encoder(ModelConfig(path=str(tiny_llama_dir)), PoolingConfig())
    plain.save_pretrained(tmp_path / "plain")
    bad = subprocess.run([EMBEDFORGE, "search", "index", "--model", str(tmp_path / "plain"), "--passages",
                          str(passages), "--output", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not a D2LLM student" in bad.stderr
