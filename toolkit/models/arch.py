"""One description of a decoder's architecture: the HF config facts that shapes, parameter counts and
parallel layouts depend on.

Built from a config object or a config.json dict, without weights. The megatron engine builds its
layers from it, the planner counts memory with it and the engine specs validate recipes against it,
so a plan can never say "fits" for a run the engine refuses on shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.config import ConfigError

# Llama-shaped decoders (RMSNorm, SwiGLU, RoPE, GQA): the families whose shapes are described here.
FAMILIES = ("llama", "mistral", "qwen2")
# LoRA target (an HF projection) -> (input dim, output dim, column-parallel under TP?)
LORA_TARGETS: dict[str, tuple[str, str, bool]] = {
    "q_proj": ("h", "q", True), "k_proj": ("h", "kv", True), "v_proj": ("h", "kv", True),
    "o_proj": ("q", "h", False), "gate_proj": ("h", "f", True), "up_proj": ("h", "f", True),
    "down_proj": ("f", "h", False),
}
_REQUIRED = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def active_sliding_window(hf_config: dict) -> int | None:
    """The attention window an HF config (as a dict) puts in force: Mistral-style `sliding_window`,
    unless `use_sliding_window` is off (Qwen2 ships a window it does not use)."""
    window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window", True) else None
    return window or None


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    model_type: str
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: dict | None = None  # the HF rope parameters when rope_type is not "default"
    attention_bias: bool = False  # q/k/v (and o) biases; Qwen2 has q/k/v biases by definition
    mlp_bias: bool = False
    tied_embeddings: bool = False
    max_positions: int = 2048
    sliding_window: int | None = None  # an active Mistral-style window
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    gated: bool = True  # SwiGLU; False = a GeLU MLP (GPT-3 shapes, used to check the activation formula)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing field {missing[0]} (an HF config.json is expected)")
        if d["model_type"] not in FAMILIES:
            raise ConfigError(f"{source}: model_type={d['model_type']!r} is not supported here; supported: "
                              f"{', '.join(FAMILIES)} (engine=hf trains other families, without a memory plan)")
        heads = d["num_attention_heads"]
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        return cls(
            model_type=d["model_type"], hidden_size=d["hidden_size"], ffn_hidden_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, vocab_size=d["vocab_size"],
            rms_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            rope_type=rope_type, rope_scaling=dict(rope) if rope_type != "default" else None,
            attention_bias=d["model_type"] == "qwen2" or bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)), tied_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_positions=int(d.get("max_position_embeddings") or 2048), sliding_window=active_sliding_window(d),
            attention_dropout=float(d.get("attention_dropout", 0.0) or 0.0),
        )

    @classmethod
    def from_hf_config(cls, hf_cfg, source: str = "config.json") -> "ModelArgs":
        return cls.from_dict(hf_cfg.to_dict(), source)

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    # ------------------------------------------------------------------ shapes
    def dim(self, key: str) -> int:
        """h = hidden, q = all query heads, kv = all key (or value) heads, f = MLP width."""
        return {"h": self.hidden_size, "q": self.num_heads * self.head_dim, "kv": self.num_kv_heads * self.head_dim,
                "f": self.ffn_hidden_size}[key]

    def lora_shape(self, target: str) -> tuple[int, int, bool]:
        """(in features, out features, column-parallel) of the projection a LoRA target adapts."""
        din, dout, column = LORA_TARGETS[target]
        return self.dim(din), self.dim(dout), column

    def padded_vocab(self, tp: int) -> int:
        """Vocabulary rounded up so every TP rank holds an equal slice (padded logits are masked)."""
        return -(-self.vocab_size // tp) * tp

    # ------------------------------------------------------------------ parameter counts (per TP rank)
    def _linear_weights(self) -> int:
        """One decoder layer's projection weights (q, k, v, o and the MLP), unsharded, without biases."""
        h, q, kv, f = self.hidden_size, self.dim("q"), self.dim("kv"), self.ffn_hidden_size
        return h * q + 2 * h * kv + q * h + (3 if self.gated else 2) * h * f

    def layer_params(self, tp: int = 1) -> int:
        """One decoder layer: the linears sharded over TP, the two norms replicated."""
        bias = self.dim("q") + 2 * self.dim("kv") if self.attention_bias else 0
        return (self._linear_weights() + bias) // tp + 2 * self.hidden_size

    def embedding_params(self, tp: int = 1) -> int:
        return self.padded_vocab(tp) // tp * self.hidden_size

    def lora_params(self, targets: tuple[str, ...] | list[str], r: int, tp: int = 1) -> int:
        """LoRA parameters of one layer: A (r x in) and B (out x r) per target; column-parallel targets
        shard B, row-parallel ones (o, down) shard A."""
        total = 0
        for target in targets:
            i, o, column = self.lora_shape(target)
            total += r * i + o * r // tp if column else r * i // tp + o * r
        return total

    # ------------------------------------------------------------------ model FLOPs (for MFU)
    def forward_flops(self, seq_len: int, *, head_tokens: int = 0) -> int:
        """Matmul FLOPs (2 per multiply-add) of one sequence's forward: every projection of every layer,
        bidirectional attention over all seq_len x seq_len pairs (QK^T and AV), and the LM head on
        `head_tokens` positions (MNTP's masked ones; 0 for an embedding forward). Norms, RoPE and
        softmax are left out, as MFU conventions do."""
        return self._weight_flops(seq_len, head_tokens) + self._attention_flops(seq_len)

    def training_flops(self, seq_len: int, *, head_tokens: int = 0, full: bool = True) -> int:
        """Forward + backward model FLOPs of one sequence. The backward of a weight matmul takes the
        input's gradient (1x its forward) and, when the weight trains, the weight's (another 1x); the
        attention matmuls have two activation operands, both needing gradients (2x). So full fine-tuning
        is 3x the forward; frozen base weights (LoRA: its adapters' own FLOPs are under 1% at the ranks
        used, left out) 2x on the projections, 3x on attention. No recomputation counted (model FLOPs,
        not hardware FLOPs)."""
        return (3 if full else 2) * self._weight_flops(seq_len, head_tokens) + 3 * self._attention_flops(seq_len)

    def _weight_flops(self, seq_len: int, head_tokens: int) -> int:
        return (self.num_layers * 2 * seq_len * self._linear_weights()
                + 2 * head_tokens * self.hidden_size * self.vocab_size)

    def _attention_flops(self, seq_len: int) -> int:
        return self.num_layers * 4 * seq_len * seq_len * self.dim("q")

    # ------------------------------------------------------------------ layouts
    def stage_layer_counts(self, pp: int, first: int = 0, last: int = 0) -> list[int]:
        """Layers of each pipeline stage: `first` / `last` layers on the first / last stage (0 = not
        fixed), the rest split evenly over the other stages, as megatron-core's
        num_layers_in_{first,last}_pipeline_stage split them."""
        fixed = {0: first, pp - 1: last} if pp > 1 else {}
        fixed = {p: n for p, n in fixed.items() if n > 0}
        middle = pp - len(fixed)
        rest = self.num_layers - sum(fixed.values())
        if rest < 0 or (middle == 0 and rest) or (middle and (rest <= 0 or rest % middle)):
            fields = " ".join(f"parallel.{name}_stage_layers={n}" for name, n in (("first", first), ("last", last)) if n)
            raise ConfigError(f"{fields or f'parallel.pp={pp}'}: the other {rest} of num_hidden_layers="
                              f"{self.num_layers} do not split evenly over the other {middle} of pp={pp} stages")
        per = rest // middle if middle else 0
        return [fixed.get(p, per) for p in range(pp)]

    def stage_layers(self, pp: int, pp_rank: int, first: int = 0, last: int = 0) -> range:
        """The global layer numbers (0-based) pipeline stage `pp_rank` holds."""
        counts = self.stage_layer_counts(pp, first, last)
        start = sum(counts[:pp_rank])
        return range(start, start + counts[pp_rank])

    def check_parallel(self, tp: int, pp: int, first: int = 0, last: int = 0) -> None:
        """Refuse a TP x PP layout these shapes cannot be split into (the vocabulary is padded instead)."""
        for name, n in (("num_attention_heads", self.num_heads), ("num_key_value_heads", self.num_kv_heads),
                        ("intermediate_size", self.ffn_hidden_size)):
            if n % tp:
                raise ConfigError(f"parallel.tp={tp}: {name}={n} is not divisible by tp")
        if not (first or last) and self.num_layers % pp:
            raise ConfigError(f"parallel.pp={pp}: num_hidden_layers={self.num_layers} is not divisible by pp "
                              "(parallel.first_stage_layers / last_stage_layers give uneven stages)")
        self.stage_layer_counts(pp, first, last)

def read_model_args(config_json: Path) -> ModelArgs:
    """ModelArgs from an HF config.json file (no weights read)."""
    try:
        data = json.loads(Path(config_json).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_json}: not valid JSON ({exc})") from None
    return ModelArgs.from_dict(data, str(config_json))
