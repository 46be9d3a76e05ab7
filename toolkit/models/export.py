"""Write an Encoder as a sentence-transformers folder (+ embedforge.json).

Layout: the HF backbone (config with the bidirectional flag, so plain `AutoModel` loads it
bidirectional) and tokenizer at the root, `1_Pooling/` holding `EmbedforgePooling`, `modules.json`
naming both. `SentenceTransformer(dir)` and `Encoder.from_pretrained(dir)` then embed identically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.atomic import atomic_dir

if TYPE_CHECKING:
    from toolkit.models.encoder import Encoder

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "toolkit.models.st_pooling.EmbedforgePooling"},
]


def write_sentence_transformers_folder(encoder: "Encoder", path: Path) -> Path:
    from peft import PeftModel

    from toolkit.models.encoder import SPEC_FILE, spec_to_json
    from toolkit.models.st_pooling import EmbedforgePooling

    if isinstance(encoder.backbone, PeftModel):
        raise ValueError("encoder backbone still has LoRA adapters: merge them (toolkit.models.lora.merge) before saving")
    with atomic_dir(path) as tmp:
        encoder.backbone.save_pretrained(tmp, safe_serialization=True)
        encoder.tokenizer.save_pretrained(tmp)
        (tmp / "modules.json").write_text(json.dumps(MODULES, indent=2))
        (tmp / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": encoder.spec.max_length, "do_lower_case": False}, indent=2)
        )
        (tmp / "config_sentence_transformers.json").write_text(
            json.dumps({"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None}, indent=2)
        )
        pool_dir = tmp / "1_Pooling"
        pool_dir.mkdir()
        EmbedforgePooling.from_pooling(encoder.pooling).save(str(pool_dir))
        (tmp / SPEC_FILE).write_text(spec_to_json(encoder.spec))
    return path
