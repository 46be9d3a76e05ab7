"""Encoding through megatron stages (toolkit/engines/megatron/encoder.py) == the HF encoder.

An encoder folder (tiny random Llama, trained-shape PMA pooling head with weights, instruction kept
out of pooling) is encoded by two gloo ranks at TP2 and at PP2 (several micro-batches per pipeline
schedule, a ragged last batch, Matryoshka truncation): every rank returns the HF `Encoder.encode`
embeddings within 1e-5, in input order.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import CORPUS, free_port
from toolkit.config import ModelConfig, PoolingConfig

pytestmark = pytest.mark.slow
TEXTS = [t + " again" * (i % 4) for i, t in enumerate(list(dict.fromkeys(CORPUS)) * 2)]
INSTRUCTION = "find the passage"


def _worker(rank: int, world: int, port: int, folder: str, parallel: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from toolkit.config import ParallelConfig
        from toolkit.distributed.parallel_dims import ParallelDims
        from toolkit.engines.megatron.encoder import MegatronEncoder

        encoder = MegatronEncoder(Path(folder), ParallelDims.from_config(ParallelConfig(**parallel), world, rank))
        full = encoder.encode(TEXTS, instruction=INSTRUCTION, batch_size=3)
        short = encoder.encode(TEXTS[:5], batch_size=2, dim=16, normalize=False)
        np.savez(f"{out}.{rank}.npz", full=full, short=short, writes=encoder.writes)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def encoder_folder(tiny_llama_dir, tmp_path_factory) -> Path:
    from toolkit.models.loading import build_encoder

    encoder, _ = build_encoder(ModelConfig(path=str(tiny_llama_dir), max_length=48),
                               PoolingConfig(mode="pma", heads=2), seed=4)
    return encoder.save_pretrained(tmp_path_factory.mktemp("megatron-encoder") / "encoder")


@pytest.mark.parametrize("parallel", [{"tp": 2}, {"pp": 2}], ids=["tp2", "pp2"])
def test_megatron_encode_equals_hf_encode(encoder_folder, tmp_path, parallel):
    from toolkit.models.encoder import Encoder

    reference = Encoder.from_pretrained(encoder_folder)
    want_full = reference.encode(TEXTS, instruction=INSTRUCTION, batch_size=3)
    want_short = reference.encode(TEXTS[:5], batch_size=2, dim=16, normalize=False)
    assert np.abs(want_full @ want_full.T - np.eye(len(TEXTS))).max() > 1e-3  # distinct embeddings
    out = tmp_path / "result"
    mp.spawn(_worker, args=(2, free_port(), str(encoder_folder), parallel, str(out)), nprocs=2, join=True)
    results = [np.load(f"{out}.{rank}.npz") for rank in range(2)]
    assert [bool(r["writes"]) for r in results] == ([True, False] if "tp" in parallel else [False, True])
    for r in results:
        np.testing.assert_allclose(r["full"], want_full, atol=1e-5)
        np.testing.assert_allclose(r["short"], want_short, atol=1e-5)
