"""Shared fixtures: a tiny BPE tokenizer and tiny random decoder folders (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(1)  # tiny models: more threads only add sync overhead

CORPUS = [
    "the cat sat on the mat",
    "a dog runs in the park with a ball",
    "machine learning turns text into vectors",
    "embeddings place similar sentences close together",
    "the quick brown fox jumps over the lazy dog",
    "language models predict the next token",
    "bidirectional attention lets every token see every other token",
    "retrieval finds passages that answer a question",
] * 4


def build_tokenizer(vocab_size: int = 256):
    """A real byte-level BPE tokenizer trained on a few sentences, with BOS/EOS/PAD/MASK."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


def save_tiny_decoder(path: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    from toolkit.models.tiny import tiny_config
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    cfg = tiny_config(model_type, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"))
