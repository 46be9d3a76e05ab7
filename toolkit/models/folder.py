"""The encoder folder format: file names, the `embedforge.json` spec and the weight loaders.

An encoder folder is a sentence-transformers folder (HF backbone + tokenizer at the root,
`1_Pooling/`, `modules.json`) plus `embedforge.json` (EncoderSpec) and, for a D2LLM student, its
Interaction Emulation Module (`iem.safetensors`). `toolkit.models.export` writes it,
`Encoder.from_pretrained` reads it whole; the loaders here put a folder's weights into a live encoder
(the engines' stage chaining, consolidation).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file

from toolkit.config import ConfigError, PoolingConfig, RunConfig, config_from_dict
from toolkit.errors import CheckpointError, MissingPathError

if TYPE_CHECKING:
    from toolkit.models.encoder import Encoder
    from toolkit.models.pooling import Pooling

SPEC_FILE = "embedforge.json"
TEACHER_KIND = "teacher"  # embedforge.json's `kind` in a fine-tuned teacher's folder (models/teacher_folder.py)
FORMAT_VERSION = 1
IEM_FILE = "iem.safetensors"
BACKBONE_FILE = "model.safetensors"
BACKBONE_INDEX = "model.safetensors.index.json"  # a sharded backbone (the megatron engine writes one per stage)
POOLING_DIR = "1_Pooling"
POOLING_FILE = f"{POOLING_DIR}/model.safetensors"


@dataclass(kw_only=True)
class EncoderSpec:
    """What `embedforge.json` records beyond the HF config: how to pool and how to tokenise."""

    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    max_length: int = 512  # tokens the folder encodes at (a run writes export.max_seq_length: serving_length)
    bidirectional: bool = True
    iem_hidden: int = 0  # > 0: a D2LLM student, with its Interaction Emulation Module (iem.safetensors)
    iem_cosine_scale: float = 0.0  # its cosine skip (d2llm.cosine_scale)
    format_version: int = FORMAT_VERSION


SERVING_MAX_LENGTH = 512  # export.max_seq_length's auto cap: the length the LLM2Vec paper evaluates at


def model_context(hf_config: Any) -> int | None:
    """The model's context in tokens (`max_position_embeddings`), None when its config does not say."""
    context = getattr(hf_config, "max_position_embeddings", None)
    return context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None


def serving_length(cfg: RunConfig, hf_config: Any) -> int:
    """The length the encoder folders of a run record (`export.max_seq_length`; 0: the model's context,
    at most SERVING_MAX_LENGTH or model.max_length, whichever is longer), so a folder is never served at
    the training crop, nor shorter than the run's own encoder length."""
    context = model_context(hf_config)
    length = cfg.export.max_seq_length
    if length and context and length > context:
        raise ConfigError(f"export.max_seq_length: {length} is longer than the model's context ({context} tokens, "
                          "max_position_embeddings)")
    cap = max(SERVING_MAX_LENGTH, cfg.model.max_length)
    return length or min(context or cap, cap)


def load_spec(spec_file: Path) -> EncoderSpec:
    try:
        data = json.loads(spec_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{spec_file}: invalid JSON ({exc})") from None
    if isinstance(data, dict) and data.get("kind") == TEACHER_KIND:
        raise CheckpointError(f"{spec_file}: a fine-tuned teacher (a causal LLM folder), not an encoder; score "
                              f"pairs with it: `embedforge teacher score --model {spec_file.parent}`")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{spec_file}: format_version={version!r}, this Embedforge reads {FORMAT_VERSION}")
    return config_from_dict(data, EncoderSpec, source=str(spec_file))


def spec_to_json(spec: EncoderSpec) -> str:
    data = asdict(spec)
    if not data["iem_cosine_scale"]:  # written only when used: a folder without it stays readable by
        del data["iem_cosine_scale"]  # an Embedforge from before the field (same format_version)
    return json.dumps(data, indent=2)


def load_encoder_weights(encoder: Encoder, folder: Path) -> None:
    """Load a finished stage's merged backbone (and pooling head) into the live encoder."""
    encoder.backbone.load_state_dict(backbone_state_dict(Path(folder)))
    load_head_weights(encoder, folder)


def backbone_state_dict(folder: Path) -> dict:
    """The backbone's tensors of an encoder folder, single-file or sharded (`model.safetensors.index.json`)."""
    state: dict = {}
    for file in backbone_files(Path(folder)):
        state.update(load_file(str(file)))
    return state


def backbone_files(folder: Path) -> list[Path]:
    """The safetensors files holding an encoder folder's backbone: one, or the shards its index lists."""
    index = folder / BACKBONE_INDEX
    if not index.is_file():
        if not (folder / BACKBONE_FILE).is_file():
            raise MissingPathError(f"{folder / BACKBONE_FILE}: missing (not an encoder folder?)")
        return [folder / BACKBONE_FILE]
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
    for name in names:
        if not (folder / name).is_file():
            raise MissingPathError(f"{folder / name}: listed in {index.name} but missing")
    return [folder / name for name in names]


def load_head_weights(encoder: Encoder, folder: Path) -> None:
    """The heads beside the backbone: the pooling head and, for a D2LLM student, its IEM."""
    load_pooling_weights(encoder.pooling, folder)
    spec = load_spec(Path(folder) / SPEC_FILE)
    if spec.iem_hidden:
        encoder.add_iem(spec.iem_hidden, spec.iem_cosine_scale)
        load_iem_weights(encoder, folder)


def load_pooling_weights(pooling: Pooling, folder: Path, *, required: bool = False) -> None:
    """A trained pooling head from an encoder folder (no-op for parameter-free heads).

    A missing weights file is skipped, or an error with `required`.
    """
    pooling_file = Path(folder) / POOLING_FILE
    if not pooling.has_parameters:
        return
    if not pooling_file.is_file():
        if required:
            raise MissingPathError(f"{pooling_file}: pooling mode {pooling.cfg.mode!r} needs its trained weights")
        return
    state = {k.removeprefix("pooling."): v for k, v in load_file(str(pooling_file)).items()}
    pooling.load_state_dict(state)


def load_iem_weights(encoder: Encoder, folder: Path) -> None:
    weights = Path(folder) / IEM_FILE
    if not weights.is_file():
        raise MissingPathError(f"{weights}: {SPEC_FILE} declares a D2LLM IEM (iem_hidden) but its weights are missing")
    encoder.iem.load_state_dict(load_file(weights))
