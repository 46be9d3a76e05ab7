"""Bidirectional Megatron-core backbones for the Llama / Mistral / Qwen2 family, built from an HF config.

The layer is megatron-core's own local `ModuleSpec` (no Transformer Engine, so it also runs on CPU)
with SDPA as core attention and the self-attention mask type switched to `padding`: every token
attends to every non-pad token, which is LLM2Vec's bidirectional conversion on Megatron. The model is megatron's `GPTModel` with one
change: the last pipeline stage returns the final-norm hidden states instead of logits, because an
encoder pools them and MNTP needs logits only at masked rows (`lm_logits`).

The LM head is never tied to the input embeddings here: it is a frozen copy (as in the hf engine),
so no embedding group has to synchronise a shared weight across pipeline stages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from toolkit.models.arch import ModelArgs


def transformer_config(arch: ModelArgs, *, tp: int, pp: int, dtype: torch.dtype = torch.float32,
                       attention_dropout: float = 0.0, hidden_dropout: float = 0.0,
                       sequence_parallel: bool = False, recompute: str = "none", first_stage_layers: int = 0,
                       last_stage_layers: int = 0):
    """megatron-core's config for these shapes; `first_stage_layers` / `last_stage_layers` (0 = an even
    split) become its uneven pipeline split."""
    from megatron.core.transformer import TransformerConfig

    arch.check_parallel(tp, pp, first_stage_layers, last_stage_layers)
    on_gpu = torch.cuda.is_available()
    kwargs = {}
    if recompute != "none":
        kwargs = dict(recompute_granularity=recompute)
        if recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,  # weights come from the HF checkpoint
        # Fusions are CUDA kernels; the unfused paths are the same math.
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,  # on GPUs it needs apex's scaled_masked_softmax_cuda, never installed here
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        calculate_per_token_loss=True,  # the engine scales each micro-batch's loss itself
        variable_seq_lengths=True,  # micro-batches are length-bucketed, not padded to max_length
        moe_token_dispatcher_type="alltoall",  # (dense model; the default allgather refuses variable lengths)
        num_layers_in_first_pipeline_stage=first_stage_layers or None,
        num_layers_in_last_pipeline_stage=last_stage_layers or None,
        **kwargs,
    )


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm with megatron's norm constructor signature.

    megatron's own torch fallback refuses sequence parallelism (without apex / Transformer Engine it
    cannot flag the weights for the TP gradient sum); the engine sums replicated gradients itself,
    so this plain norm serves with and without sequence parallelism.
    """

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps, dtype=getattr(config, "params_dtype", None))


def stage_layers(arch: ModelArgs, config, pp_rank: int) -> range:
    """The global layers of pipeline stage `pp_rank` under megatron config `config`."""
    return arch.stage_layers(config.pipeline_model_parallel_size, pp_rank,
                             config.num_layers_in_first_pipeline_stage or 0, config.num_layers_in_last_pipeline_stage or 0)


def block_spec(arch: ModelArgs, num_layers: int):
    """megatron-core's local GPT layer spec, padding-only (bidirectional) attention mask, core
    attention through SDPA (attention.py), as a block of `num_layers` layers (this pipeline stage's)
    with a final norm."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    from toolkit.engines.megatron.attention import SDPACoreAttention

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.padding
    layer.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[layer] * num_layers, layer_norm=RMSNorm))


def build_backbone(arch: ModelArgs, config, *, pre_process: bool, post_process: bool, pp_rank: int = 0):
    """This pipeline stage's model; its layers carry megatron's global layer numbers, checked here
    against `ModelArgs.stage_layers` (the conversion's and the planner's split)."""
    from megatron.core.models.gpt import GPTModel

    class EncoderGPTModel(GPTModel):
        """GPTModel whose last stage returns final-norm hidden states [s, b, h] (no vocabulary logits)."""

        def _postprocess(self, hidden_states, *args, **kwargs):
            return hidden_states

        def lm_logits(self, rows: Tensor) -> Tensor:
            """Vocab-parallel logits [t, V/tp] of full hidden rows [t, h] (only the rows MNTP scores).

            The output layer's own forward would treat rows as a sequence slice under sequence
            parallelism; its (frozen) weight is applied directly, the rows' gradient summed over TP.
            """
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            return F.linear(copy_to_tensor_model_parallel_region(rows), self.output_layer.weight)

    rope = {}
    if arch.rope_scaling:
        rope = dict(rope_scaling=True, rope_scaling_factor=float(arch.rope_scaling.get("factor", 8.0)))
    layers = stage_layers(arch, config, pp_rank)
    model = EncoderGPTModel(
        config,
        block_spec(arch, len(layers)),
        vocab_size=arch.padded_vocab(config.tensor_model_parallel_size),
        max_sequence_length=arch.max_positions,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        **rope,
    )
    numbers = [layer.layer_number - 1 for layer in model.decoder.layers]  # megatron's own offsets
    if numbers != list(layers):
        raise RuntimeError(f"pipeline stage {pp_rank}: megatron built layers {numbers}, the conversion expects {list(layers)}")
    if post_process:
        model.output_layer.weight.requires_grad_(False)  # the MNTP head stays frozen, as in the hf engine
    return model


def padding_mask(attention_mask: Tensor) -> Tensor:
    """HF attention mask [b, s] (1 = token) -> megatron key-padding mask [b, 1, 1, s] (True = masked)."""
    return ~attention_mask.bool()[:, None, None, :]


def causal_padding_mask(attention_mask: Tensor) -> Tensor:
    """HF mask [b, s] (1 = token) -> megatron's causal + key-padding mask [b, 1, s, s] (True = masked):
    the plain LLM's attention (a D2LLM teacher), on the same bidirectional layer spec."""
    s = attention_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    return ~(causal[None, None] & attention_mask.bool()[:, None, None, :])


def vocab_rows(weight: Tensor, token_ids: list[int], *, tp_rank: int, tp_group=None) -> Tensor:
    """Rows `token_ids` [n, h] (float32) of a vocabulary-parallel matrix (this TP rank holds rows
    tp_rank * V/tp ...), each from the rank that holds it, summed over `tp_group` (None: TP = 1)."""
    per_rank = weight.shape[0]
    rows = torch.zeros(len(token_ids), weight.shape[1], dtype=torch.float32, device=weight.device)
    for i, token in enumerate(token_ids):
        local = token - tp_rank * per_rank
        if 0 <= local < per_rank:
            rows[i] = weight[local].detach().float()
    if tp_group is not None:
        dist.all_reduce(rows, group=tp_group)
    return rows


def tp_sharded_parameters(model) -> set[str]:
    """Names of parameters split across TP ranks (everything else is replicated on each TP rank).

    Decided by layer type, not by megatron's `tensor_model_parallel` attribute, which is not set when
    weights are created on CPU without initialisation (ours come from the HF checkpoint).
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    names = set()
    for prefix, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)) or (
                    isinstance(module, RowParallelLinear) and pname == "weight"):
                names.add(f"{prefix}.{pname}" if prefix else pname)
    return names
