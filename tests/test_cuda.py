"""What needs a GPU (skipped without CUDA; run by bench/gpu_check.sh on a GPU machine).

- SDPA core attention on CUDA == megatron's unfused attention (fp32), and in bf16 on the
  memory-efficient kernel alone (a fallback to the math kernel fails);
- packed == padded on CUDA for the HF backbone with sdpa and, when flash-attn is installed, with
  flash-attn's varlen non-causal kernel (bf16: within bf16 rounding of the padded fp32 reference);
- one hf-engine training step on `device: cuda` in bf16 equals the CPU fp32 step's loss within bf16
  rounding;
- the deepspeed (ZeRO-3) and megatron engines train on `device: cuda` with the hf engine's losses.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.helpers import CORPUS
from toolkit.models.bidirectional import make_bidirectional
from toolkit.models.packing import pack_for_backbone
from toolkit.models.tiny import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FLASH = importlib.util.find_spec("flash_attn") is not None


def _backbone(attn: str, dtype: torch.dtype):
    from transformers import AutoModel

    config = make_bidirectional(tiny_config("llama", num_hidden_layers=2))
    torch.manual_seed(0)
    return AutoModel.from_config(config, attn_implementation=attn, dtype=dtype).cuda().eval()


@pytest.mark.parametrize("attn", ["sdpa", pytest.param("flash_attention_2", marks=pytest.mark.skipif(
    not FLASH, reason="flash-attn not installed"))])
def test_packed_equals_padded_on_cuda(attn):
    reference = _backbone("sdpa", torch.float32)
    model = _backbone(attn, torch.bfloat16)
    lengths = torch.tensor([17, 5, 9, 30, 2, 12])
    s = int(lengths.max())
    ids = torch.randint(3, 200, (len(lengths), s), generator=torch.Generator().manual_seed(0)).cuda()
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long().cuda()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        packed = pack_for_backbone(ids, mask, attn)
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                    attention_mask=packed.attention_mask(attn, torch.bfloat16)).last_hidden_state
        got = packed.unpack(out).float()
    keep = mask.bool()
    assert packed.input_ids.numel() < ids.numel()
    torch.testing.assert_close(got[keep], want[keep], atol=5e-2, rtol=5e-2)


def test_sdpa_core_attention_on_cuda_equals_unfused():
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from tests.helpers import free_port
    from toolkit.engines.megatron.attention import SDPACoreAttention

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
        config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                   kv_channels=16, attention_dropout=0.0, masked_softmax_fusion=False)
        args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.padding, attention_type="self")
        reference, sdpa = DotProductAttention(**args).cuda(), SDPACoreAttention(**args).cuda()
        q = torch.randn(33, 3, 4, 16, device="cuda")
        k, v = torch.randn(33, 3, 2, 16, device="cuda"), torch.randn(33, 3, 2, 16, device="cuda")
        keep = torch.arange(33, device="cuda")[None, :] < torch.tensor([33, 20, 7], device="cuda")[:, None]
        mask = ~keep[:, None, None, :]
        rows = keep.T[:, :, None]
        want = reference(q, k, v, mask) * rows
        torch.testing.assert_close(sdpa(q, k, v, mask) * rows, want, atol=1e-5, rtol=1e-5)
        # bf16 on the memory-efficient kernel only: a silent fallback to the math kernel (s x s scores)
        # fails here instead of passing
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            got = sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask).float() * rows
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_hf_engine_step_on_cuda_bf16_matches_cpu_fp32(tiny_llama_dir):
    from toolkit.config import config_from_dict
    from toolkit.distributed.parallel_dims import ParallelDims
    from toolkit.engines.spec import build_engine

    losses = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        cfg = config_from_dict({
            "output_dir": "unused", "seed": 7, "device": device,
            "model": {"path": str(tiny_llama_dir), "max_length": 40, "dtype": dtype},
            "stages": [{"name": "supervised", "steps": 1, "objective": {"kind": "supervised", "temperature": 0.05},
                        "data": {"path": "unused", "max_length": 40, "pack": True}}]})
        engine = build_engine(cfg, ParallelDims.from_config(cfg.parallel, 1, 0))
        engine.build(add_mask_token=False)
        engine.begin_stage(0, cfg.stages[0], data_kind="pair", generator=torch.Generator().manual_seed(0))
        assert engine.encoder.device.type == device
        texts = list(dict.fromkeys(CORPUS))
        batch = [{"query": texts[i], "positive": texts[i + 1], "negatives": [texts[i + 2]], "task": "t"}
                 for i in range(4)]
        losses[device] = engine.step_fn.step(batch, 1.0).loss
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=5e-2)


@pytest.mark.parametrize("engine", ["deepspeed", "megatron"])
def test_engine_trains_on_cuda_like_the_hf_engine(tiny_llama_dir, tmp_path, engine):
    """A 3-step full fine-tuning MNTP stage on `device: cuda` (fp32, one process): the deepspeed engine
    at ZeRO-3 (built partitioned) and megatron-core on CUDA give the hf engine's losses on CUDA."""
    import yaml

    from tests.helpers import losses, run_embedforge, write_data

    texts, _ = write_data(tmp_path)
    runs = {}
    for name in ("hf", engine):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({
            "output_dir": str(tmp_path / name), "seed": 4, "engine": name, "device": "cuda",
            **({"zero": {"stage": 3}} if name == "deepspeed" else {}),
            "model": {"path": str(tiny_llama_dir), "max_length": 40}, "pooling": {"mode": "mean"},
            "stages": [{"name": "mntp", "steps": 3, "lora": {"enabled": False},
                        "objective": {"kind": "mntp", "mntp": {"mask_token": "eos", "mask_probability": 0.3}},
                        "data": {"path": str(texts), "batch_size": 4, "max_length": 40}, "optimizer": {"lr": 1e-3}}],
            "checkpoint": {"every_steps": 100}, "logging": {"every_steps": 1, "tensorboard": False, "progress": False}}))
        r = run_embedforge("train", str(recipe))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = losses(tmp_path / name)
    assert runs[engine].keys() == runs["hf"].keys() and len(runs["hf"]) == 3
    for key, want in runs["hf"].items():
        assert runs[engine][key] == pytest.approx(want, rel=1e-3), key
