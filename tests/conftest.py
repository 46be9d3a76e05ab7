"""Shared fixtures: a tiny BPE tokenizer, tiny random decoder folders, a tiny teacher and its pair
shards (no downloads). Plain helpers live in tests/helpers.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import CHAT, CORPUS, build_tokenizer, save_tiny_decoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(1)  # tiny models: more threads only add sync overhead


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny random llama as a D2LLM teacher, with a chat template (tests.helpers.CHAT)."""
    from transformers import AutoTokenizer

    path = save_tiny_decoder(tmp_path_factory.mktemp("teacher"), "llama", seed=3)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """16 pair samples (2 negatives each) in 4 shards of 2 tasks, for the teacher to score."""
    from data_pipelines.writer import build_shards

    tmp = tmp_path_factory.mktemp("pairs")
    rows = [{"id": f"p{i}", "query": CORPUS[i % 8], "positive": CORPUS[(i + 1) % 8],
             "negatives": [CORPUS[(i + 3) % 8], CORPUS[(i + 5) % 8]], "task": "t1" if i < 10 else "t2"}
            for i in range(16)]
    src = tmp / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_shards([str(src)], tmp / "shards", "pair", shard_samples=5)  # t1: 5+5, t2: 5+1
    return tmp / "shards"
