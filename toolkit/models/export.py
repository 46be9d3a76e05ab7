"""Write an Encoder as a sentence-transformers folder (+ embedforge.json).

Layout: the HF backbone (config with the bidirectional flag, so plain `AutoModel` loads it
bidirectional) and tokenizer at the root, `1_Pooling/`, and `modules.json` naming both.
`SentenceTransformer(dir)` and `Encoder.from_pretrained(dir)` then embed identically.

Mean and last-token pooling are written as sentence-transformers' own `Pooling` (with
`include_prompt=False`), which loads anywhere. Weighted-mean (LLM2Vec's weights count pooled tokens
only), BOS (first real token, even with a prompt) and the trained heads have no exact
sentence-transformers equivalent: they use `EmbedforgePooling`, which needs
`SentenceTransformer(dir, trust_remote_code=True)` and `embedforge` installed. A D2LLM student also
writes its Interaction Emulation Module (`iem.safetensors`; `embedforge.json` names its size).

`embedforge.json` and `sentence_bert_config.json` record the length the folder encodes at: a run
writes its `export.max_seq_length` (auto: the model's context, at most 512 or model.max_length if
longer), never the training crop.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file
from transformers import AutoConfig

from toolkit.atomic import atomic_dir
from toolkit.config import ConfigError
from toolkit.models.folder import IEM_FILE, POOLING_DIR, SPEC_FILE, load_spec, model_context, spec_to_json

if TYPE_CHECKING:
    from torch import nn

    from toolkit.models.encoder import Encoder
    from toolkit.models.folder import EncoderSpec
    from toolkit.models.pooling import Pooling

NATIVE_MODES = {"mean": "mean", "last": "lasttoken"}


def modules_json(pooling_type: str) -> list[dict]:
    return [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": pooling_type},
    ]


def needs_trust_remote_code(mode: str) -> bool:
    return mode not in NATIVE_MODES


def write_sentence_transformers_folder(encoder: "Encoder", path: Path, max_length: int | None = None) -> Path:
    """The encoder as a folder; `max_length` (a run's serving length) replaces the spec's in what is written."""
    from peft import PeftModel

    if isinstance(encoder.backbone, PeftModel):
        raise ValueError("encoder backbone still has LoRA adapters: merge them (toolkit.models.lora.merge) before saving")
    spec = encoder.spec if max_length is None else dataclasses.replace(encoder.spec, max_length=max_length)
    with atomic_dir(path) as tmp:
        encoder.backbone.save_pretrained(tmp, safe_serialization=True)
        write_folder_files(tmp, encoder.tokenizer, spec)
        write_heads(tmp, encoder.pooling, encoder.iem)
    return path


def write_folder_files(folder: Path, tokenizer, spec: "EncoderSpec") -> None:
    """Everything but the weights: tokenizer, `modules.json`, the sentence-transformers configs and
    `embedforge.json` (a sharded writer's rank 0 writes these, the heads come from the last stage)."""
    tokenizer.save_pretrained(folder)
    pooling_type = ("sentence_transformers.models.Pooling" if spec.pooling.mode in NATIVE_MODES
                    else "toolkit.models.st_pooling.EmbedforgePooling")
    (folder / "modules.json").write_text(json.dumps(modules_json(pooling_type), indent=2))
    write_length_files(folder, spec)
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None}, indent=2)
    )


def write_length_files(folder: Path, spec: "EncoderSpec") -> None:
    """`embedforge.json` and `sentence_bert_config.json`: both record the length the folder encodes at."""
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": spec.max_length, "do_lower_case": False}, indent=2)
    )
    (folder / SPEC_FILE).write_text(spec_to_json(spec))


def set_folder_max_length(folder: Path, max_length: int, *, field: str) -> None:
    """Re-record an encoder folder's serving length (`embedforge export --max-seq-length`); refused
    above the backbone's context, naming `field`."""
    check_serving_length(folder, max_length, field=field)
    write_length_files(folder, dataclasses.replace(load_spec(folder / SPEC_FILE), max_length=max_length))


def check_serving_length(model_folder: Path, max_length: int, *, field: str) -> None:
    """Refuse a serving length outside 1..the context of the model in `model_folder`, naming `field`."""
    context = model_context(AutoConfig.from_pretrained(model_folder))
    if max_length < 1 or (context and max_length > context):
        raise ConfigError(f"{field} {max_length}: must be in 1..{context or 'the model context'} (the model's "
                          f"context, max_position_embeddings in {Path(model_folder) / 'config.json'})")


def write_heads(folder: Path, pooling: "Pooling", iem: "nn.Module | None") -> None:
    """The pooling module folder (`1_Pooling/`) and, for a D2LLM student, the IEM's weights."""
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling

    from toolkit.models.st_pooling import EmbedforgePooling  # lazy: sentence-transformers (~8 s import)

    mode = pooling.cfg.mode
    if mode in NATIVE_MODES:
        pool = STPooling(pooling.output_dim, pooling_mode=NATIVE_MODES[mode], include_prompt=False)
    else:
        pool = EmbedforgePooling.from_pooling(pooling)
    pool_dir = folder / POOLING_DIR
    pool_dir.mkdir()
    pool.save(str(pool_dir))
    if iem is not None:  # D2LLM student: the pair scorer beside the embedding model
        save_file({k: v.detach().contiguous().cpu() for k, v in iem.state_dict().items()}, str(folder / IEM_FILE))
