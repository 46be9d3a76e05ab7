"""The D2LLM teacher through megatron stages (toolkit/teacher/megatron_teacher.py) == the HF teacher.

Two gloo ranks hold a tiny random Llama teacher (chat template, GQA, vocabulary split over TP) at
TP2, then at PP2; the yes / no scores and the last-position features of a mix of symmetric and
asymmetric pairs of different lengths (left-padded batches) equal `Teacher`'s within 1e-5 in fp32,
on every rank (each rank gets the broadcast results; only the last stage's TP rank 0 writes).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import CORPUS, NO, YES, free_port

pytestmark = pytest.mark.slow
TOL = 1e-5
TEXTS = list(dict.fromkeys(CORPUS))
QUERIES = [TEXTS[i] for i in range(7)]
PASSAGES = [TEXTS[i + 1] + " and more" * i for i in range(7)]
SYMMETRIC = [i % 3 == 0 for i in range(7)]


def _worker(rank: int, world: int, port: int, model_dir: str, parallel: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from transformers import AutoTokenizer

        from toolkit.config import ParallelConfig
        from toolkit.distributed.parallel_dims import ParallelDims
        from toolkit.engines.megatron.inference import MegatronForward
        from toolkit.teacher.megatron_teacher import MegatronTeacher
        from toolkit.teacher.scoring import TeacherPrompt

        dims = ParallelDims.from_config(ParallelConfig(**parallel), world, rank)
        forward = MegatronForward(Path(model_dir), dims, include_head=True)
        teacher = MegatronTeacher(forward, AutoTokenizer.from_pretrained(model_dir), TeacherPrompt(yes=YES, no=NO))
        scores, feats = teacher.score(QUERIES, PASSAGES, SYMMETRIC, batch_size=3, features=True)
        torch.save({"scores": scores, "feats": feats, "writes": teacher.writes}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("parallel", [{"tp": 2}, {"pp": 2}], ids=["tp2", "pp2"])
def test_megatron_teacher_scores_equal_the_hf_teacher(teacher_dir, tmp_path, parallel):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.teacher.scoring import Teacher, TeacherPrompt

    reference = Teacher(AutoModelForCausalLM.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(teacher_dir),
                        TeacherPrompt(yes=YES, no=NO))
    want_scores, want_feats = reference.score(QUERIES, PASSAGES, SYMMETRIC, batch_size=3, features=True)
    assert want_scores.std() > 1e-4  # distinct scores, not a constant comparison
    out = tmp_path / "result"
    mp.spawn(_worker, args=(2, free_port(), str(teacher_dir), parallel, str(out)), nprocs=2, join=True)
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert [r["writes"] for r in results] == ([True, False] if "tp" in parallel else [False, True])
    for r in results:
        torch.testing.assert_close(r["scores"], want_scores, atol=TOL, rtol=0)
        torch.testing.assert_close(r["feats"], want_feats, atol=TOL, rtol=TOL)
