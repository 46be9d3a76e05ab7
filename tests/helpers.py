"""Shared test helpers (plain functions and constants; fixtures live in tests/conftest.py).

Tiny models and tokenizers (no downloads), tiny data sets and recipes, the `embedforge` CLI and
torchrun as subprocesses, free ports. Heavy or fast-moving imports (data_pipelines, toolkit,
transformers, webdataset) stay inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from data_pipelines.manifest import Manifest
    from toolkit.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
EMBEDFORGE = str(Path(sys.executable).parent / "embedforge")

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

# D2LLM teacher prompts: the tiny byte-level tokenizer has no merges, single letters are its one-token answers
YES, NO = "y", "n"
CHAT = ("{% for m in messages %}<s>user: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")


# ----------------------------------------------------------------------------- tiny models
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


def save_tiny_decoder(path: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """A tiny random decoder (toolkit.models.tiny) and the tiny tokenizer, saved as an HF folder."""
    from transformers import AutoModelForCausalLM

    from toolkit.models.tiny import tiny_config

    tok = build_tokenizer()
    cfg = tiny_config(model_type, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_encoder(folder: Path, model_dir: Path, max_length: int) -> Path:
    """An untrained encoder (mean pooling) over a decoder folder, saved as export writes one."""
    from toolkit.config import ModelConfig, PoolingConfig
    from toolkit.models.loading import build_encoder

    encoder, _ = build_encoder(ModelConfig(path=str(model_dir), max_length=max_length), PoolingConfig())
    return encoder.save_pretrained(folder)


# ----------------------------------------------------------------------------- tiny data
def write_shards(folder: Path, samples: list[dict], per_shard: int, kind: str = "text") -> Manifest:
    """Shards of `per_shard` samples (one task per shard for pair data) plus a manifest, written directly
    with webdataset.TarWriter (independent of our writer)."""
    import hashlib

    import webdataset as wds

    from data_pipelines.manifest import Manifest, ShardInfo
    from data_pipelines.records import sample_key

    folder.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[dict]] = {}
    for s in samples:
        by_task.setdefault(s.get("task", "default") if kind != "text" else "default", []).append(s)
    shards = []
    for task, rows in by_task.items():
        for n, start in enumerate(range(0, len(rows), per_shard)):
            name = f"{task}-{n:06d}.tar"
            with wds.TarWriter(str(folder / name)) as sink:
                for s in rows[start : start + per_shard]:
                    sink.write({"__key__": sample_key(s["id"]), "json": json.dumps(s).encode()})
            data = (folder / name).read_bytes()
            shards.append(ShardInfo(name=name, samples=len(rows[start : start + per_shard]), bytes=len(data),
                                    sha256=hashlib.sha256(data).hexdigest(), task=task))
    manifest = Manifest(kind=kind, shards=shards, source="test")
    manifest.save(folder)
    manifest.root = folder
    return manifest


def text_samples(n: int, prefix: str = "t") -> list[dict]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [{"id": f"{prefix}{i}", "text": " ".join(words[: 1 + i % len(words)]) + f" number {i}"} for i in range(n)]


def write_data(tmp_path: Path) -> tuple[Path, Path]:
    """Text and pair shards (one shard each) of CORPUS, built by `data_pipelines.writer` into tmp_path."""
    from data_pipelines.writer import build_shards

    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"{t} number {i}"}) + "\n" for i, t in enumerate(CORPUS)))
    pairs = tmp_path / "pairs.jsonl"
    rows = []
    for i in range(16):
        rows.append({"query": CORPUS[i % 8], "positive": CORPUS[(i + 1) % 8], "negatives": [CORPUS[(i + 3) % 8]],
                     "instruction": "find the dog", "task": "t1" if i < 8 else "t2"})
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text_shards, pair_shards = tmp_path / "text-shards", tmp_path / "pair-shards"
    if not text_shards.exists():
        build_shards([str(texts)], text_shards, "text")
        build_shards([str(pairs)], pair_shards, "pair")
    return text_shards, pair_shards


# ----------------------------------------------------------------------------- tiny recipes
def run_config(tmp_path, model_dir, out="run", model_extra=None, **stage_overrides) -> RunConfig:
    """The 3-stage in-process recipe (MNTP, SimCSE, supervised; LoRA) on `model_dir`, output in tmp_path / out;
    `<stage>__<field>=value` overrides one stage's field."""
    from toolkit.config import config_from_dict

    texts, pairs = write_data(tmp_path)
    stages = [
        {"name": "mntp", "objective": {"kind": "mntp", "mntp": {"mask_token": "new", "mask_probability": 0.3}},
         "data": {"path": str(texts), "batch_size": 4, "max_length": 48}, "steps": 4,
         "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
         "optimizer": {"lr": 1e-3}, "schedule": {"warmup_steps": 1}},
        {"name": "simcse", "objective": {"kind": "simcse"}, "attention_dropout": 0.1,
         "data": {"path": str(texts), "batch_size": 4, "max_length": 48}, "steps": 4, "grad_accum": 2,
         "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
         "optimizer": {"lr": 1e-3}},
        {"name": "supervised", "objective": {"kind": "supervised", "temperature": 0.02},
         "data": {"path": str(pairs), "batch_size": 4, "max_length": 48}, "steps": 3,
         "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
         "optimizer": {"lr": 1e-3}},
    ]
    for key, value in stage_overrides.items():
        name, field = key.split("__")
        for s in stages:
            if s["name"] == name:
                s[field] = value
    cfg = {"output_dir": str(tmp_path / out), "seed": 3, "model": {"path": str(model_dir), "max_length": 48, **(model_extra or {})},
           "pooling": {"mode": "mean"}, "stages": stages,
           "checkpoint": {"every_steps": 2, "keep_last": 2},
           "logging": {"every_steps": 1, "tensorboard": True, "progress": False}}
    return config_from_dict(cfg)


def two_stage_recipe(tmp_path: Path) -> Path:
    """The 2-stage tiny recipe file (full MNTP, then LoRA supervised) on the megatron engine, a 4-layer
    tiny llama, checkpoints every 2 steps; callers switch the engine / data mode for other layouts."""
    import yaml

    texts, pairs = write_data(tmp_path)
    model = save_tiny_decoder(tmp_path / "tiny-llama", "llama", num_hidden_layers=4)
    data = {"batch_size": 4, "max_length": 48}
    cfg = {
        "output_dir": "unset", "seed": 11, "engine": "megatron",
        "model": {"path": str(model), "max_length": 48},
        "pooling": {"mode": "mean"},
        "stages": [
            {"name": "mntp", "steps": 4, "lora": {"enabled": False}, "data": {"path": str(texts), **data},
             "objective": {"kind": "mntp", "mntp": {"mask_probability": 0.3, "mask_token": "eos"}},
             "optimizer": {"lr": 1e-3}, "schedule": {"warmup_steps": 1}},
            {"name": "supervised", "steps": 3, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
             "data": {"path": str(pairs), **data},
             "objective": {"kind": "supervised", "temperature": 0.05}, "optimizer": {"lr": 1e-3}},
        ],
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
    }
    path = tmp_path / "megatron-tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run: Path) -> dict[tuple[str, int], float]:
    """A run's per-step losses from its metrics.jsonl, keyed by (stage, step)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["stage"], r["step"]): r["loss"] for r in rows}


# ----------------------------------------------------------------------------- processes
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for gloo / torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(env: dict | None = None) -> dict[str, str]:
    """This process's environment plus `env`, for a subprocess."""
    return {**os.environ, **(env or {})}


def run_embedforge(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None,
               ) -> subprocess.CompletedProcess:
    """`embedforge *args` (the .venv's console script), output captured as text."""
    return subprocess.run([EMBEDFORGE, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=subprocess_env(env))


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`embedforge *args` under `torch.distributed.run --standalone` with `nproc` local ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           EMBEDFORGE, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)
