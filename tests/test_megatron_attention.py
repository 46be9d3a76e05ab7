"""SDPA core attention (toolkit/engines/megatron/attention.py) == megatron-core's unfused
`DotProductAttention` it replaces: outputs and input gradients within 1e-5 in fp32, with grouped
K / V (GQA), a key-padding mask and one all-padding sample (finite, not NaN). The whole-model parity
with HF (tests/test_megatron_parity.py) runs through it at every TP / PP layout."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import free_port

TOL = 1e-5


def _compare(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        from megatron.core import parallel_state
        from megatron.core.transformer import TransformerConfig
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        from megatron.core.transformer.enums import AttnMaskType

        from toolkit.distributed import megatron_shims
        from toolkit.engines.megatron.attention import SDPACoreAttention

        megatron_shims.apply()
        parallel_state.initialize_model_parallel(1, 1)
        megatron_shims.seed_model_parallel_rng(0, 0)  # megatron forks its dropout stream even at p = 0
        config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                   kv_channels=16, attention_dropout=0.0, masked_softmax_fusion=False,
                                   use_cpu_initialization=True)
        args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.padding, attention_type="self")
        reference, sdpa = DotProductAttention(**args), SDPACoreAttention(**args)
        s, b = 7, 3
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(s, b, 4, 16, generator=gen)
        k, v = torch.randn(s, b, 2, 16, generator=gen), torch.randn(s, b, 2, 16, generator=gen)
        lengths = torch.tensor([7, 4, 0])  # a full row, a padded row, an all-padding row
        keep = torch.arange(s)[None, :] < lengths[:, None]  # [b, s]
        mask = ~keep[:, None, None, :]  # megatron's key-padding mask: True = masked
        outputs, grads = [], []
        for module in (reference, sdpa):
            inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
            out = module(*inputs, mask)  # [s, b, heads * head_dim]
            assert torch.isfinite(out).all()
            weight = keep.T[:, :, None].float()  # the loss reads real tokens only
            (out * weight * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
            outputs.append(out * weight)
            grads.append([t.grad for t in inputs])
        torch.testing.assert_close(outputs[1], outputs[0], atol=TOL, rtol=TOL)
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_sdpa_core_attention_equals_megatron_dot_product_attention():
    mp.spawn(_compare, args=(free_port(),), nprocs=1, join=True)
