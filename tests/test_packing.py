"""Sequence packing (`data.pack`, toolkit/models/packing.py): packed == padded.

One training micro-batch of texts of mixed lengths through the hf engine, with and without packing:
the loss and every gradient (full fine-tuning, so every backbone weight is compared) agree within
1e-5 in fp32, for MNTP and for supervised contrastive learning (instructions, hard negatives), under
sdpa (boolean block-diagonal mask) and eager (additive mask) attention; the same on the megatron
engine at TP2 (sequence parallel) and PP2. Packing computes fewer token slots than padding."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import CORPUS
from toolkit.config import ConfigError, config_from_dict
from toolkit.distributed.parallel_dims import ParallelDims
from toolkit.engines.spec import build_engine
from toolkit.models.packing import pack_batch, pack_for_backbone

TOL = 1e-5
TEXTS = list(dict.fromkeys(CORPUS))


def recipe(model_dir, kind: str, impl: str, pack: bool, engine: str = "hf", parallel: dict | None = None):
    objective = {"kind": "mntp", "mntp": {"mask_token": "eos", "mask_probability": 0.3}} if kind == "mntp" else {
        "kind": "supervised", "temperature": 0.05}
    return config_from_dict({
        "output_dir": "unused", "seed": 7, "engine": engine, "parallel": parallel or {},
        "model": {"path": str(model_dir), "max_length": 40, "attn_implementation": impl},
        "pooling": {"mode": "mean"},
        "stages": [{"name": kind, "steps": 1, "lora": {"enabled": False}, "objective": objective,
                    "data": {"path": "unused", "max_length": 40, "pack": pack}}],
    })


def samples(kind: str) -> list[dict]:
    if kind == "mntp":
        return [{"text": TEXTS[i] + " and so on" * (i % 4)} for i in range(6)]
    return [{"query": TEXTS[i], "positive": TEXTS[i + 1] + " indeed" * (i % 3), "negatives": [TEXTS[i + 2]],
             "instruction": "Find the passage", "task": "t"} for i in range(4)]


def one_step(model_dir, kind: str, impl: str, pack: bool) -> tuple[float, dict[str, torch.Tensor]]:
    cfg = recipe(model_dir, kind, impl, pack)
    engine = build_engine(cfg, ParallelDims.from_config(cfg.parallel, 1, 0))
    engine.build(add_mask_token=False)
    engine.begin_stage(0, cfg.stages[0], data_kind="text" if kind == "mntp" else "pair",
                       generator=torch.Generator().manual_seed(0))
    assert engine.encoder.pack is pack
    stats = engine.step_fn.step(samples(kind), 1.0)
    grads = {name: p.grad.clone() for name, p in engine.params.items() if p.grad is not None}
    return stats.loss, grads


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["mntp", "supervised"])
def test_packed_step_equals_padded_step(tiny_llama_dir, kind, impl):
    padded_loss, padded = one_step(tiny_llama_dir, kind, impl, pack=False)
    packed_loss, packed = one_step(tiny_llama_dir, kind, impl, pack=True)
    assert packed_loss == pytest.approx(padded_loss, abs=TOL)
    assert packed.keys() == padded.keys() and len(padded) > 10
    for name, grad in padded.items():
        torch.testing.assert_close(packed[name], grad, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_packing_keeps_each_text_apart_and_computes_fewer_slots():
    lengths = [9, 2, 3, 7, 1, 4]
    s = max(lengths)
    ids = torch.arange(1, len(lengths) * s + 1).view(len(lengths), s)
    mask = (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]).long()
    packed = pack_batch(ids, mask, max_tokens=s)
    assert packed.input_ids.shape == (4, 9)  # first fit: [9], [2, 3, 1], [7], [4]: 36 slots, not 54
    hidden = packed.input_ids[..., None].float()  # a "backbone" that returns its input ids
    torch.testing.assert_close(packed.unpack(hidden)[..., 0], (ids * mask).float())  # every token back in place
    same = packed.attention_mask("sdpa", torch.float32)
    for r in range(packed.segments.shape[0]):
        seg = packed.segments[r]
        assert torch.equal(same[r, 0], seg[:, None] == seg[None, :])
        starts = packed.position_ids[r] == 0
        assert starts.sum() == seg.unique().numel()  # positions restart at every text (and the free tail)
    assert packed.attention_mask("flash_attention_2", torch.float32) is None  # varlen: position_ids only
    flat = pack_for_backbone(ids, mask, "flash_attention_2")  # transformers reads packing from one row only
    assert flat.input_ids.shape == (1, sum(lengths)) and int((flat.position_ids == 0).sum()) == len(lengths)
    torch.testing.assert_close(flat.unpack(flat.input_ids[..., None].float())[..., 0], (ids * mask).float())
    additive = packed.attention_mask("eager", torch.float32)
    assert bool(((additive == 0) == same).all())


def test_packing_a_sliding_window_model_is_refused(tmp_path):
    """sdpa / eager take the packed block mask as it is: a window shorter than the texts would be lost."""
    from tests.helpers import save_tiny_decoder

    model_dir = save_tiny_decoder(tmp_path / "mistral", "mistral", sliding_window=8)
    cfg = recipe(model_dir, "mntp", "sdpa", pack=True)
    engine = build_engine(cfg, ParallelDims.from_config(cfg.parallel, 1, 0))
    engine.build(add_mask_token=False)
    with pytest.raises(ConfigError, match=r"stages.mntp.data.pack=true: this model's sliding_window=8 < data.max_length=40"):
        engine.begin_stage(0, cfg.stages[0], data_kind="text", generator=torch.Generator())


# ---------------------------------------------------------------------------------------------- megatron
def _megatron_worker(rank: int, world: int, port: int, model_dir: str, parallel: dict, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for pack in (False, True):
            for kind in ("mntp", "supervised"):
                cfg = recipe(model_dir, kind, "sdpa", pack, engine="megatron", parallel=parallel)
                engine = build_engine(cfg, ParallelDims.from_config(cfg.parallel, world, rank))
                engine.build(add_mask_token=False)
                engine.begin_stage(0, cfg.stages[0], data_kind="text" if kind == "mntp" else "pair",
                                   generator=torch.Generator().manual_seed(0))
                loss, _ = engine.forward_backward([samples(kind)])
                results[pack, kind] = (loss, engine.hf_state_dict(grads=True))
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [{"tp": 2, "sequence_parallel": True}, {"pp": 2}], ids=["tp2-sp", "pp2"])
def test_megatron_packed_step_equals_padded_step(tiny_llama_dir, tmp_path, parallel):
    """The megatron engine at TP2 (sequence parallel: packed rows padded to a multiple of TP) and PP2
    (packed rows through the pipeline): MNTP and supervised losses and every gradient as padded."""
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    out = tmp_path / "results.pt"
    mp.spawn(_megatron_worker, args=(2, free_port(), str(tiny_llama_dir), parallel, str(out)), nprocs=2, join=True)
    results = torch.load(out)
    for kind in ("mntp", "supervised"):
        (padded_loss, padded), (packed_loss, packed) = results[False, kind], results[True, kind]
        assert packed_loss == pytest.approx(padded_loss, abs=TOL), kind
        assert packed.keys() == padded.keys() and len(padded) > 10
        for name, grad in padded.items():
            torch.testing.assert_close(packed[name], grad, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{kind} {n}: {m}")
