"""Fast, single-process checks of the megatron engine's parts: CPU shims, ParallelDims, the
HF <-> Megatron re-layout for every TP x PP split, architecture validation, lazy weights, configs."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import free_port, save_tiny_decoder
from toolkit.config import ConfigError, ParallelConfig, config_from_dict
from toolkit.distributed import megatron_shims
from toolkit.distributed.parallel_dims import ParallelDims
from toolkit.engines.megatron.convert import hf_to_megatron, megatron_to_hf
from toolkit.engines.megatron.weights import HFWeights
from toolkit.errors import CheckpointError
from toolkit.models.arch import ModelArgs
from toolkit.models.tiny import tiny_config, tiny_model


# ---------------------------------------------------------------------------------------------- shims
def test_shims_apply_and_check_against_the_installed_megatron():
    assert megatron_shims.apply() is True  # no CUDA here
    assert megatron_shims.apply() is True  # idempotent
    megatron_shims.check()
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.core.transformer.utils as tutils

    assert isinstance(mrandom.get_cuda_rng_tracker(), megatron_shims._CpuRngTracker)
    assert tutils.get_default_causal_mask(3).device.type == "cpu"
    assert torch.cuda.current_device() == torch.device("cpu")


def test_shims_fail_loudly_when_megatron_moves_a_patched_symbol(monkeypatch):
    import megatron.core.transformer.utils as tutils

    monkeypatch.delattr(tutils, "get_default_causal_mask")
    with pytest.raises(RuntimeError, match=r"transformer\.utils\.get_default_causal_mask no longer exists"):
        megatron_shims.check()


def test_cpu_rng_tracker_forks_a_reproducible_stream_and_restores_the_outer_one():
    tracker = megatron_shims._CpuRngTracker()
    tracker.add("model-parallel-rng", 1234)
    torch.manual_seed(0)
    outer = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer)  # the default stream is untouched
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the tracked stream advanced
    replay = megatron_shims._CpuRngTracker()
    replay.add("model-parallel-rng", 1234)
    with replay.fork("model-parallel-rng"):
        assert torch.equal(torch.rand(3), first)
    with pytest.raises(RuntimeError, match="already exists"):
        tracker.add("other", 1234)


# ---------------------------------------------------------------------------------------------- dims
def test_parallel_dims_layout_matches_megatron_order():
    dims = [ParallelDims.from_config(ParallelConfig(tp=2, pp=2), 8, r) for r in range(8)]
    assert dims[0].dp == 2
    coords = [(d.tp_rank, d.dp_rank, d.pp_rank) for d in dims]
    assert coords == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    for d in dims:
        assert d.rank_of(dp=d.dp_rank, tp=d.tp_rank, pp=d.pp_rank) == d.rank
    for axis, size in (("dp", 2), ("tp", 2), ("pp", 2), ("mp", 4)):
        groups = dims[0]._ranks(axis)
        assert sorted(r for g in groups for r in g) == list(range(8)) and all(len(g) == size for g in groups)
    assert dims[0].last_stage_rank == 4 and dims[3].last_stage_rank == 7


def test_parallel_dims_reject_bad_layouts():
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by tp\(4\)"):
        ParallelDims.from_config(ParallelConfig(tp=4), 6, 0)
    with pytest.raises(ConfigError, match=r"dp\(3\) x tp\(2\) x pp\(1\) x cp\(1\) = 6 != world size 4"):
        ParallelDims.from_config(ParallelConfig(tp=2, dp=3), 4, 0)
    with pytest.raises(ConfigError, match="parallel.cp: context parallelism is reserved"):
        ParallelConfig(cp=2)
    with pytest.raises(ConfigError, match="sequence_parallel: needs parallel.tp > 1"):
        ParallelConfig(sequence_parallel=True)


def test_engine_choice_is_validated():
    base = {"output_dir": "x", "model": {"path": "x"},
            "stages": [{"name": "a", "steps": 1, "data": {"path": "x"}, "objective": {"kind": "mntp"}}]}
    from toolkit.engines.spec import build_engine, validate_run

    with pytest.raises(ConfigError, match=r"engine: 'fsdp' is not an engine; registered engines: deepspeed, hf, megatron"):
        validate_run(config_from_dict({**base, "engine": "fsdp"}))
    cfg = config_from_dict({**base, "parallel": {"tp": 2}})
    with pytest.raises(ConfigError, match="engine=hf is data-parallel only"):
        build_engine(cfg, ParallelDims(dp=1, tp=2, world_size=2))


# ---------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("model_type,vocab", [("llama", 384), ("qwen2", 387)])
def test_hf_megatron_round_trip_for_every_split(model_type, vocab):
    """Re-layout is exact for TP in {1, 2, 4} x PP in {1, 2}, incl. Qwen2 biases and a padded vocabulary."""
    model = tiny_model(model_type, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       vocab_size=vocab)
    hf = model.state_dict()
    arch = ModelArgs.from_hf_config(model.config)
    for tp in (1, 2, 4):
        for pp in (1, 2):
            shards = {(t, p): hf_to_megatron(hf, arch, tp=tp, tp_rank=t, pp=pp, pp_rank=p)
                      for t in range(tp) for p in range(pp)}
            emb = shards[(0, 0)]["embedding.word_embeddings.weight"]
            assert emb.shape[0] == arch.padded_vocab(tp) // tp
            back = megatron_to_hf(shards, arch, tp=tp, pp=pp)
            assert sorted(back) == sorted(hf), (tp, pp)
            for name, value in hf.items():
                assert torch.equal(back[name], value), (tp, pp, name)


def test_qkv_layout_groups_query_heads_with_their_kv_head():
    """Megatron's fused QKV: per KV group [its query heads | k | v]; a TP rank owns whole groups."""
    model = tiny_model("llama")  # 4 heads, 2 KV heads, head_dim 16
    arch = ModelArgs.from_hf_config(model.config)
    hf = model.state_dict()
    shard = hf_to_megatron(hf, arch, tp=2, tp_rank=1, pp=1, pp_rank=0)["decoder.layers.0.self_attention.linear_qkv.weight"]
    q, k, v = (hf[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    expected = torch.cat([q[32:64], k[16:32], v[16:32]])  # group 1: query heads 2-3, kv head 1
    assert torch.equal(shard, expected)


def test_model_args_and_megatron_validation_reject_what_megatron_cannot_run():
    from toolkit.engines.megatron.validate import validate_model

    with pytest.raises(ConfigError, match="model_type='gemma' is not supported here; supported: llama, mistral, qwen2"):
        ModelArgs.from_hf_config(tiny_config("gemma"))
    arch = ModelArgs.from_hf_config(tiny_config("llama"))  # 4 heads, 2 KV heads, 2 layers
    with pytest.raises(ConfigError, match=r"parallel.tp=4: num_key_value_heads=2 is not divisible by tp"):
        arch.check_parallel(4, 1)
    with pytest.raises(ConfigError, match="parallel.pp=4: num_hidden_layers=2 is not divisible by pp"):
        arch.check_parallel(1, 4)
    cfg = tiny_config("llama")
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    run = config_from_dict({"output_dir": "x", "engine": "megatron", "model": {"path": "x"},
                            "stages": [{"name": "a", "steps": 1, "data": {"path": "x"}, "objective": {"kind": "mntp"}}]})
    with pytest.raises(ConfigError, match="rope_type='yarn' is not supported"):
        validate_model(run, ModelArgs.from_hf_config(cfg))


def test_lazy_hf_weights(tmp_path):
    folder = save_tiny_decoder(tmp_path / "m")
    weights = HFWeights(folder)
    from safetensors.torch import load_file

    full = load_file(str(folder / "model.safetensors"))
    assert sorted(weights) == sorted(full)
    assert torch.equal(weights["model.norm.weight"], full["model.norm.weight"])
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        HFWeights(tmp_path)
    arch = ModelArgs.from_hf_config(tiny_config("llama"))
    with pytest.raises(CheckpointError, match=r"my.ckpt: tensor 'model.embed_tokens.weight' is missing"):
        hf_to_megatron({}, arch, tp=1, tp_rank=0, pp=1, pp_rank=0, source="my.ckpt")


def test_cpu_rng_tracker_nested_forks_continue_one_stream():
    """Sequence parallelism forks around a block and again inside it: one stream, as on CUDA."""
    nested = megatron_shims._CpuRngTracker()
    nested.add("model-parallel-rng", 7)
    with nested.fork():
        a = torch.rand(2)
        with nested.fork():
            b = torch.rand(2)
        c = torch.rand(2)
    flat = megatron_shims._CpuRngTracker()
    flat.add("model-parallel-rng", 7)
    with flat.fork():
        assert torch.equal(torch.cat([a, b, c]), torch.rand(6))


def test_commit_drops_steps_of_an_abandoned_trajectory(tmp_path):
    """After an explicit resume from step-2, a new step-4 must win over the old step-6."""
    from toolkit.checkpoint.manager import begin_step_dir, commit_step_dir, complete_steps, latest_complete

    for step in (2, 6):
        commit_step_dir(begin_step_dir(tmp_path, step, 0), {"step": step}, 0, keep_last=5)
    commit_step_dir(begin_step_dir(tmp_path, 4, 0), {"step": 4}, 0, keep_last=5)
    assert [n for n, _ in complete_steps(tmp_path)] == [2, 4]
    assert latest_complete(tmp_path).name == "step-4"
    commit_step_dir(begin_step_dir(tmp_path, 4, 0), {"step": 4}, 0, keep_last=1)  # rewrite in place
    assert [n for n, _ in complete_steps(tmp_path)] == [4] and not list(tmp_path.glob(".*"))


def test_lazy_hf_weights_with_prefix(tmp_path):
    folder = save_tiny_decoder(tmp_path / "m")
    weights = HFWeights(folder, prefix="x.")
    assert all(name.startswith("x.model.") or name.startswith("x.lm_head") for name in weights)
    assert weights["x.model.norm.weight"].shape == (64,)


def test_single_process_group_under_torchrun_does_not_wait_for_the_agent_store():
    """`torchrun --nproc-per-node 1` sets TORCHELASTIC_USE_AGENT_STORE: a tcp:// init then connects as a
    client to a store nobody serves and waits 30 min. The one-rank group must not depend on the launcher."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCHELASTIC_USE_AGENT_STORE="True", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    code = ("import torch.distributed as dist\n"
            "from toolkit.distributed.parallel_dims import init_single_process_group\n"
            "init_single_process_group()\n"
            "assert dist.get_world_size() == 1\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
