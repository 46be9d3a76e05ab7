"""A fine-tuned D2LLM teacher on disk: an HF causal-LM folder plus `embedforge.json` naming its prompt.

`embedforge teacher score --model FOLDER` loads it like any LLM and reads the prompt it was trained
with (templates, answer words, chat template or not, truncation length), so it is scored exactly as
it learned. The LM head is written as its own tensor when it no longer equals the input embeddings
(full fine-tuning of a tied model trains the embeddings; the head stayed a frozen copy).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from toolkit.assets import resolve_model_path
from toolkit.atomic import atomic_dir
from toolkit.config import ModelConfig, TeacherPrompt, config_from_dict
from toolkit.errors import CheckpointError
from toolkit.models.folder import FORMAT_VERSION, SPEC_FILE, TEACHER_KIND
from toolkit.models.loading import DTYPES


def save_teacher_folder(backbone: nn.Module, lm_head: nn.Module, tokenizer, model_cfg: ModelConfig,
                        prompt: TeacherPrompt, folder: Path, symmetric_tasks: list[str] | None = None) -> Path:
    """Write the teacher (merged `backbone` + frozen `lm_head`) atomically (`atomic_dir`), with the prompt
    and the tasks it reads with the symmetric template."""
    folder = Path(folder)
    config = AutoConfig.from_pretrained(resolve_model_path(model_cfg.path))
    embeddings = backbone.get_input_embeddings().weight
    tied = lm_head.weight.shape == embeddings.shape and torch.equal(lm_head.weight, embeddings)
    config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False) and tied)
    with torch.random.fork_rng():  # its random init is overwritten below
        causal = AutoModelForCausalLM.from_config(config, dtype=DTYPES[model_cfg.dtype])
    causal.resize_token_embeddings(embeddings.shape[0])
    missing, unexpected = causal.get_decoder().load_state_dict(backbone.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: the trained backbone does not fit {model_cfg.path}'s causal LM "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if not config.tie_word_embeddings:
        with torch.no_grad():
            causal.get_output_embeddings().weight.copy_(lm_head.weight)
    with atomic_dir(folder) as tmp:
        causal.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_teacher_spec(tmp, prompt, symmetric_tasks)
    return folder


def write_teacher_spec(folder: Path, prompt: TeacherPrompt, symmetric_tasks: list[str] | None) -> None:
    """`embedforge.json` of a teacher folder: its prompt and the tasks read with the symmetric template
    (data: `read_teacher_spec` parses it back)."""
    spec = {"format_version": FORMAT_VERSION, "kind": TEACHER_KIND, "prompt": asdict(prompt),
            "symmetric_tasks": list(symmetric_tasks or [])}
    (Path(folder) / SPEC_FILE).write_text(json.dumps(spec, indent=2))


def is_teacher_folder(folder: Path) -> bool:
    return _teacher_spec(folder) is not None


def read_teacher_spec(folder: Path) -> tuple[TeacherPrompt, list[str]] | None:
    """(prompt, symmetric tasks) a fine-tuned teacher folder was trained with; None for any other model."""
    data = _teacher_spec(folder)
    if data is None:
        return None
    prompt = config_from_dict(data["prompt"], TeacherPrompt, source=f"{Path(folder) / SPEC_FILE} (prompt)")
    return prompt, [str(t) for t in data.get("symmetric_tasks", [])]


def _teacher_spec(folder: Path) -> dict | None:
    spec = Path(folder) / SPEC_FILE
    if not spec.is_file():
        return None
    try:
        data = json.loads(spec.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and data.get("kind") == TEACHER_KIND else None
