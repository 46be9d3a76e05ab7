"""Bidirectional Megatron-core backbones for the Llama / Mistral / Qwen2 family, built from an HF config.

The layer is megatron-core's own local `ModuleSpec` (no Transformer Engine, so it also runs on CPU)
with the self-attention mask type switched to `padding`: every token attends to every non-pad token,
which is LLM2Vec's bidirectional conversion on Megatron. The model is megatron's `GPTModel` with one
change: the last pipeline stage returns the final-norm hidden states instead of logits, because an
encoder pools them and MNTP needs logits only at masked rows (`lm_logits`).

The LM head is never tied to the input embeddings here: it is a frozen copy (as in the hf engine),
so no embedding group has to synchronise a shared weight across pipeline stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_FAMILIES = frozenset({"llama", "mistral", "qwen2"})


@dataclass(frozen=True)
class Arch:
    """The HF config facts the Megatron layout depends on."""

    model_type: str
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    qkv_bias: bool
    tied_embeddings: bool
    max_positions: int
    rope_scaling: dict | None

    @classmethod
    def from_hf(cls, hf_cfg) -> "Arch":
        model_type = getattr(hf_cfg, "model_type", None)
        if model_type not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"engine=megatron: model_type={model_type!r} is not supported; supported: "
                f"{', '.join(sorted(SUPPORTED_FAMILIES))} (use engine=hf for other families)"
            )
        heads = hf_cfg.num_attention_heads
        head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // heads
        rope = getattr(hf_cfg, "rope_parameters", None) or getattr(hf_cfg, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"engine=megatron: rope_type={rope_type!r} is not supported (default, llama3)")
        megatron_llama3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        off = {k: rope[k] for k, v in megatron_llama3.items() if rope_type == "llama3" and k in rope and rope[k] != v}
        if off:
            raise ValueError(f"engine=megatron: llama3 rope scaling with {off} differs from megatron-core's fixed "
                             f"{megatron_llama3}; the positions would silently differ from the HF model")
        theta = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
        if getattr(hf_cfg, "mlp_bias", False) or getattr(hf_cfg, "attention_bias", False) and model_type != "qwen2":
            raise ValueError("engine=megatron: attention/MLP biases other than Qwen2's q/k/v bias are not supported")
        return cls(
            model_type=model_type,
            hidden_size=hf_cfg.hidden_size,
            ffn_hidden_size=hf_cfg.intermediate_size,
            num_layers=hf_cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf_cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=hf_cfg.vocab_size,
            rms_eps=hf_cfg.rms_norm_eps,
            rope_theta=float(theta),
            qkv_bias=model_type == "qwen2",
            tied_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
            max_positions=hf_cfg.max_position_embeddings,
            rope_scaling=dict(rope) if rope_type == "llama3" else None,
        )

    def check_sequence_length(self, hf_cfg, max_length: int) -> None:
        """Mistral-style sliding windows are not built on megatron: refuse texts that would reach them."""
        window = getattr(hf_cfg, "sliding_window", None)
        if window and getattr(hf_cfg, "use_sliding_window", True) and window < max_length:
            raise ValueError(f"engine=megatron: sliding_window={window} < model.max_length={max_length}; "
                             "lower model.max_length (attention here is full, not windowed)")

    def check_parallel(self, tp: int, pp: int) -> None:
        if self.num_kv_heads % tp or self.num_heads % tp:
            raise ValueError(f"parallel.tp={tp} must divide num_attention_heads={self.num_heads} and "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"parallel.tp={tp} must divide intermediate_size={self.ffn_hidden_size}")
        if self.num_layers % pp:
            raise ValueError(f"parallel.pp={pp} must divide num_hidden_layers={self.num_layers}")

    def padded_vocab(self, tp: int) -> int:
        """Vocabulary rounded up so every TP rank holds an equal slice (padded logits are masked)."""
        return -(-self.vocab_size // tp) * tp


def transformer_config(arch: Arch, *, tp: int, pp: int, dtype: torch.dtype = torch.float32,
                       attention_dropout: float = 0.0, hidden_dropout: float = 0.0,
                       sequence_parallel: bool = False, recompute: str = "none"):
    from megatron.core.transformer import TransformerConfig

    arch.check_parallel(tp, pp)
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
        masked_softmax_fusion=on_gpu,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        calculate_per_token_loss=True,  # the engine scales each micro-batch's loss itself
        variable_seq_lengths=True,  # micro-batches are length-bucketed, not padded to max_length
        moe_token_dispatcher_type="alltoall",  # (dense model; the default allgather refuses variable lengths)
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


def block_spec(arch: Arch, pp: int):
    """megatron-core's local GPT layer spec, padding-only (bidirectional) attention mask, as a block
    of this pipeline stage's layers with a final norm."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.padding
    layer.submodules.input_layernorm = RMSNorm
    layer.submodules.pre_mlp_layernorm = RMSNorm
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[layer] * (arch.num_layers // pp), layer_norm=RMSNorm))


def build_backbone(arch: Arch, config, *, pre_process: bool, post_process: bool):
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
    model = EncoderGPTModel(
        config,
        block_spec(arch, config.pipeline_model_parallel_size),
        vocab_size=arch.padded_vocab(config.tensor_model_parallel_size),
        max_sequence_length=arch.max_positions,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        **rope,
    )
    if post_process:
        model.output_layer.weight.requires_grad_(False)  # the MNTP head stays frozen, as in the hf engine
    return model


def padding_mask(attention_mask: Tensor) -> Tensor:
    """HF attention mask [b, s] (1 = token) -> megatron key-padding mask [b, 1, 1, s] (True = masked)."""
    return ~attention_mask.bool()[:, None, None, :]
