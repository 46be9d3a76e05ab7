"""The benchmark's Embedforge worker runs every workload and reports what the tables read."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from toolkit.models.arch import read_model_args

TEXTS = ["the cat sat on the mat", "a dog runs in the park with a ball", "language models predict the next token",
         "retrieval finds passages that answer a question", "the quick brown fox", "embeddings place similar sentences close"]


@pytest.mark.parametrize("workload,batching", [("mntp", "file"), ("simcse", "bucketed"), ("supervised", "bucketed"),
                                               ("encode", "file")])
def test_embedforge_worker(tmp_path, tiny_llama_dir, workload, batching):
    data = tmp_path / "data.jsonl"
    if workload == "supervised":
        rows = [{"query": a, "positive": b, "negative": c, "instruction": "Find the match"}
                for a, b, c in zip(TEXTS, TEXTS[1:] + TEXTS[:1], TEXTS[2:] + TEXTS[:2])]
    else:
        rows = [{"text": t} for t in TEXTS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, str(ROOT / "bench" / "embedforge_worker.py"), "--model", str(tiny_llama_dir),
           "--workload", workload, "--batch-size", "2", "--seq-len", "48", "--steps", "2", "--warmup-steps", "1",
           "--threads", "1", "--texts", str(data), "--batching", batching]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # exactly one JSON line on stdout; logs go to stderr
    out = json.loads(lines[0])
    assert out["workload"] == workload
    assert out["impl"] == "embedforge" + ("-bucketed" if batching == "bucketed" else "")
    assert out["tokens_per_s"] > 0 and out["step_s"] > 0 and out["peak_rss_mb"] > 0
    if workload != "encode":
        assert out["loss"] is not None and out["loss"] > 0
        # MFU's numerator: per real token, about 2 x 2 x the layers' weights (forward and the input
        # gradients; the base is frozen under LoRA) plus attention and MNTP's head: within 1x-1.5x of that
        arch = read_model_args(tiny_llama_dir / "config.json")
        per_token = out["model_flops_per_s"] / out["tokens_per_s"]
        assert 1.0 <= per_token / (4 * arch.num_layers * (arch.layer_params() - 2 * arch.hidden_size)) < 1.5, per_token
