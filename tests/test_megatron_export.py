"""The megatron engine's sharded encoder folder: planned from the architecture, written per pipeline stage.

- the plan (pure): files never span two pipeline stages, a unit is never split, and the files list
  exactly the tensors `AutoModel` has;
- TP2 x PP2 (4 gloo processes): `end_stage` writes one file per stage, and the folder equals the
  single-file export of the same weights (`Encoder.save_pretrained`): every tensor bit for bit
  through `AutoModel`, embeddings within 1e-6 through `Encoder.from_pretrained` and
  `SentenceTransformer`; chaining in the same process reads nothing, and reading the folder back
  (a resume at the next stage) restores every rank's shards exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import CORPUS, free_port, save_tiny_decoder
from toolkit.config import config_from_dict
from toolkit.engines.megatron.hf_export import plan_shards
from toolkit.models.arch import ModelArgs
from toolkit.models.folder import serving_length
from toolkit.models.tiny import tiny_config


def _cfg(model_dir: Path, tp: int, pp: int):
    return config_from_dict({
        "output_dir": "unused", "seed": 5, "engine": "megatron", "parallel": {"tp": tp, "pp": pp},
        "model": {"path": str(model_dir), "max_length": 40}, "pooling": {"mode": "latent_attention"},
        "stages": [{"name": "s", "steps": 1, "lora": {"enabled": False}, "data": {"path": "x", "max_length": 40},
                    "objective": {"kind": "supervised"}}],
    })


def test_plan_covers_the_hf_backbone_and_respects_stages():
    from transformers import AutoModel

    config = tiny_config("qwen2", num_hidden_layers=4)  # q/k/v biases
    arch = ModelArgs.from_hf_config(config)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModel.from_config(config).state_dict().items()}
    for pp, budget in ((1, 1 << 40), (2, 1 << 40), (2, 1)):
        files = plan_shards(arch, pp, 4, budget)
        listed = {n: s for f in files for n, s in f.shapes.items()}
        assert listed == expected, (pp, budget)
        assert len(files) == 1 or all(f.name == f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                                      for i, f in enumerate(files))
        assert all(u.stage == f.stage for f in files for u in f.units)
        assert [f.stage for f in files] == sorted(f.stage for f in files)
    assert [f.name for f in plan_shards(arch, 1, 4, 1 << 40)] == ["model.safetensors"]  # as save_pretrained
    assert len(plan_shards(arch, 2, 4, 1 << 40)) == 2  # one file per stage
    assert len(plan_shards(arch, 2, 4, 1)) == 6  # embedding, 4 layers, norm: one unit per file


def _worker(rank: int, world: int, port: int, model_dir: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from toolkit.distributed.parallel_dims import ParallelDims
        from toolkit.engines.megatron.engine import MegatronEngine
        from toolkit.engines.megatron.weights import HFWeights

        cfg = _cfg(Path(model_dir), tp=2, pp=2)
        dims = ParallelDims.from_config(cfg.parallel, world, rank)
        engine = MegatronEngine(cfg, dims)
        engine.build(add_mask_token=False)
        on_meta = all(p.is_meta for p in engine.encoder.pooling.parameters())
        assert on_meta != dims.is_last_stage, "the pooling head lives on the last stage only"
        final = Path(out) / "final"
        engine.end_stage(final)
        before = {k: v.clone() for k, v in engine.model.state_dict().items() if not k.endswith("_extra_state")}
        engine.load_stage_output(final)  # chaining in this process: the weights are in place
        engine._output_in_place = None  # a resume at the next stage: read the folder back
        engine.load_stage_output(final)
        after = engine.model.state_dict()
        bad = [k for k, v in before.items() if not torch.equal(v, after[k])]
        assert not bad, f"rank {rank}: read back differs in {bad[:3]}"
        assert set(HFWeights(final)) >= {"embed_tokens.weight", "norm.weight"}
        torch.save({"ok": True}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tp2_pp2_sharded_export_equals_single_file_export(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from toolkit.models.encoder import Encoder
    from toolkit.models.folder import load_encoder_weights
    from toolkit.models.loading import build_encoder

    model_dir = save_tiny_decoder(tmp_path / "tiny", "llama", num_hidden_layers=4)  # vocab 259: padded at TP2
    mp.spawn(_worker, args=(4, free_port(), str(model_dir), str(tmp_path)), nprocs=4, join=True)
    assert all((tmp_path / f"rank{r}.pt").is_file() for r in range(4))
    final = tmp_path / "final"
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    assert not (final / "model.safetensors").exists()

    cfg = _cfg(model_dir, tp=1, pp=1)
    reference, _ = build_encoder(cfg.model, cfg.pooling, seed=cfg.seed)  # the hf engine's start: same head seed
    reference.spec.max_length = serving_length(cfg, reference.backbone.config)  # a stage's folder serves at it
    reference.save_pretrained(tmp_path / "single")
    for name in ("config.json", "modules.json", "embedforge.json", "1_Pooling/config.json"):
        assert json.loads((final / name).read_text()) == json.loads((tmp_path / "single" / name).read_text()), name

    sharded = AutoModel.from_pretrained(final).state_dict()
    single = AutoModel.from_pretrained(tmp_path / "single").state_dict()
    assert sorted(sharded) == sorted(single)
    assert all(torch.equal(sharded[k], single[k]) for k in single)

    texts = CORPUS[:6]
    want = Encoder.from_pretrained(tmp_path / "single").encode(texts)
    got = Encoder.from_pretrained(final).encode(texts)
    assert np.abs(got - want).max() <= 1e-6
    st = SentenceTransformer(str(final), device="cpu", trust_remote_code=True)
    assert np.abs(st.encode(texts, normalize_embeddings=True) - want).max() <= 1e-6
    reference.backbone.embed_tokens.weight.data.zero_()  # the single-process loaders read the sharded folder
    load_encoder_weights(reference, final)
    assert np.abs(reference.encode(texts) - want).max() <= 1e-6


def _whole_model_export(cfg, index: int, step_dir: Path, output: Path) -> None:
    """The export as it was before streaming: the stage's model rebuilt whole in one process (TP1 / PP1,
    dist_checkpointing reshards), the checkpoint loaded, the adapters merged by the engine."""
    import dataclasses

    from toolkit.distributed.parallel_dims import ParallelDims
    from toolkit.engines.megatron.engine import MegatronEngine
    from toolkit.models.stage_encoder import previous_final
    from toolkit.objectives.steps import NEEDS_KIND
    from toolkit.run_layout import RunLayout

    single = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tp=1, pp=1, dp=1))
    engine = MegatronEngine(single, ParallelDims(dp=1, world_size=1, rank=0))
    engine.build(add_mask_token=False)
    if index > 0:
        engine.load_stage_output(previous_final(RunLayout.of_stage_dir(step_dir.parent), cfg, index))
    stage = single.stages[index]
    engine.begin_stage(index, stage, data_kind=NEEDS_KIND[stage.objective.kind][0], generator=torch.Generator())
    engine.load(step_dir)
    engine.end_stage(output)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_step_export_streams_unit_by_unit_and_equals_the_whole_model_export(tmp_path, monkeypatch):
    """A TP2 x PP2 run's full-weights (MNTP) and LoRA (supervised) step checkpoints, streamed in one
    process: each unit reads only its own chunks, and the folder equals the whole-model export."""
    from transformers import AutoModel

    from tests.helpers import torchrun, two_stage_recipe
    from toolkit.config import load_config
    from toolkit.distributed.parallel_dims import init_single_process_group
    from toolkit.engines.megatron import step_export
    from toolkit.engines.megatron.hf_export import unit_shapes
    from toolkit.models.encoder import Encoder

    recipe = two_stage_recipe(tmp_path)
    run = tmp_path / "run"
    r = torchrun("train", str(recipe), f"output_dir={run}", "parallel.tp=2", "parallel.pp=2", nproc=4)
    assert r.returncode == 0, r.stderr[-4000:]
    cfg = load_config(run / "config.yaml")
    reads: list[tuple[object, int]] = []
    chunk = step_export.CheckpointReader._chunk
    monkeypatch.setattr(step_export.CheckpointReader, "_chunk",
                        lambda self, key, c: reads.append((key, c)) or chunk(self, key, c))
    call = step_export.StepUnits.__call__

    def unit_call(self, unit):  # bytes read per unit <= the unit's own (padded) size
        reads.clear()
        out = call(self, unit)
        read = sum(torch.Size(c.sizes).numel() for _, c in reads) * 4
        own = sum(torch.Size(s).numel() for s in unit_shapes(self.arch, unit).values()) * 4
        pad = (self.arch.padded_vocab(8) - self.arch.vocab_size) * self.arch.hidden_size * 4
        assert read <= own + (pad if unit.kind == "embed" else 0), (unit, read, own)
        return out

    monkeypatch.setattr(step_export.StepUnits, "__call__", unit_call)
    arch = ModelArgs.from_hf_config(AutoModel.from_pretrained(cfg.model.path).config)
    init_single_process_group()
    try:
        for index, step in ((0, run / "00-mntp" / "step-2"), (1, run / "01-supervised" / "step-2")):
            streamed, whole = tmp_path / f"streamed-{index}", tmp_path / f"whole-{index}"
            step_export.export_step_streaming(cfg, index, step, streamed, shard_bytes=1)  # one unit per file
            assert len(json.loads((streamed / "model.safetensors.index.json").read_text())["weight_map"]) > 0
            assert len(list(streamed.glob("model-*.safetensors"))) == arch.num_layers + 2
            _whole_model_export(cfg, index, step, whole)
            a, b = AutoModel.from_pretrained(streamed).state_dict(), AutoModel.from_pretrained(whole).state_dict()
            assert sorted(a) == sorted(b)
            assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, index
            texts = CORPUS[:6]
            diff = np.abs(Encoder.from_pretrained(streamed).encode(texts) - Encoder.from_pretrained(whole).encode(texts))
            assert diff.max() <= 1e-6, index
    finally:
        dist.destroy_process_group()
