"""`embedforge export` of a megatron `step-N/`: streamed unit by unit from the dist_checkpointing files.

One process, any saved TP / PP layout, never the whole model in memory: for each unit of the
sharded folder's plan (`hf_export.plan_shards`: the embedding, one decoder layer, the final norm)
the reader assembles exactly that unit's global slices from the saved chunks (layer `i` of the
layer-stacked keys, its TP pieces), converts them to HF names and streams them into the open
safetensors file. A LoRA stage's checkpoint holds adapters only: the
unit's base tensors are read from the stage's start (the base model or the previous stage's folder,
tensor by tensor) and each adapter is merged as peft merges (W += alpha / r * B @ A).

Memory bound: the checkpoint's metadata plus about 2 x the largest unit (a layer or the embedding at
its saved padded size: the unit's slices and their HF conversion, or, while a chunk is read, its
bytes and the loaded chunk), plus one TP piece when a unit is assembled from several, whatever the
model size.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import Tensor

from toolkit.atomic import atomic_dir
from toolkit.config import RunConfig
from toolkit.engines.megatron.checkpoint import MODEL_DIR
from toolkit.engines.megatron.convert import megatron_layer_to_hf
from toolkit.engines.megatron.hf_export import (
    DEFAULT_SHARD_BYTES,
    Unit,
    index_json,
    plan_shards,
    write_causal_config,
    write_config,
    write_shard_file,
)
from toolkit.engines.megatron.lora import HF_MODULE, TARGETS
from toolkit.engines.megatron.weights import INDEX, HFWeights
from toolkit.errors import CheckpointError, MissingPathError
from toolkit.models.arch import ModelArgs
from toolkit.models.encoder import prepare_tokenizer
from toolkit.models.export import write_folder_files, write_heads
from toolkit.models.folder import IEM_FILE, SPEC_FILE, EncoderSpec, load_spec, serving_length
from toolkit.models.iem import InteractionEmulation
from toolkit.models.loading import DTYPES, resolve_model_path
from toolkit.models.pooling import Pooling
from toolkit.models.stage_encoder import previous_final
from toolkit.models.teacher_folder import write_teacher_spec
from toolkit.run_layout import RunLayout

LAYERS = "backbone.decoder.layers."
# megatron's TransformerLayer saves the local spec's norms under Transformer Engine's names
SAVED_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
               "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


class CheckpointReader:
    """Slices of a torch_dist (PyTorch DCP) checkpoint read chunk by chunk from its `.distcp` files.

    Each saved chunk (a TP / PP piece of one layer, of the embedding, ...) is a `torch.save`d tensor
    at a recorded byte range: a request reads only the chunks it overlaps, one at a time
    (`weights_only=True`: data, never code). `dist_checkpointing.load` cannot serve a partial request
    in one process (its template must own every fragment of a layer-stacked tensor)."""

    def __init__(self, folder: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        if not folder.is_dir():
            raise MissingPathError(f"{folder}: missing; this checkpoint was not written by engine=megatron")
        self.folder = folder
        try:  # the checkpoint's own index (verified against the step's checksums before export)
            self.meta = FileSystemReader(str(folder)).read_metadata()
        except Exception as exc:
            raise CheckpointError(f"{folder}: not a torch_dist checkpoint ({exc})") from exc
        self.tensors = {k: v for k, v in self.meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.tensors if k.startswith(prefix) and not k.endswith("_extra_state"))

    def load(self, key: str, layer: int | None = None) -> Tensor:
        """A whole tensor, or index `layer` of a layer-stacked one (its first axis)."""
        md = self.tensors[key]
        size = list(md.size)
        start = [0] * len(size)
        if layer is not None:
            start[0], size[0] = layer, 1
        overlapping = []
        for chunk in md.chunks:
            lo = [max(a, c) for a, c in zip(start, chunk.offsets)]
            hi = [min(a + n, c + m) for a, n, c, m in zip(start, size, chunk.offsets, chunk.sizes)]
            if all(h > lo_ for lo_, h in zip(lo, hi)):
                overlapping.append((chunk, lo, hi))
        if len(overlapping) == 1 and list(overlapping[0][0].offsets) == start and list(overlapping[0][0].sizes) == size:
            piece = self._chunk(key, overlapping[0][0])  # saved exactly as asked (TP1): no assembly copy
            return piece[0] if layer is not None else piece
        out = torch.empty(size, dtype=md.properties.dtype)
        covered = 0
        for chunk, lo, hi in overlapping:
            piece = self._chunk(key, chunk)
            src = piece[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets))]
            out[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] = src
            covered += src.numel()
            del piece, src
        if covered != out.numel():
            raise CheckpointError(f"{self.folder}: the saved chunks of {key} do not cover the requested slice")
        return out[0] if layer is not None else out

    def _chunk(self, key: str, chunk) -> Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.meta.storage_data[MetadataIndex(key, torch.Size(chunk.offsets))]
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{self.folder}: {key} is stored transformed ({info.transform_descriptors}); "
                                  "unsupported here")
        path = self.folder / info.relative_path
        with open(path, "rb") as f:
            f.seek(info.offset)
            raw = io.BytesIO(f.read(info.length))
        try:
            return torch.load(raw, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable chunk of {key} ({exc})") from None


class StepUnits:
    """The HF tensors of each unit of a step checkpoint: from the saved weights, or base + merged adapters.

    `head` (a teacher's causal-LM folder): the model the stage started from, whose LM head (or tied
    embedding) the stage kept frozen; the backbone's names then carry the causal LM's `model.`."""

    def __init__(self, reader: CheckpointReader, arch: ModelArgs, dtype: torch.dtype, base: HFWeights | None,
                 scaling: float, head: HFWeights | None = None):
        self.reader, self.arch, self.dtype, self.base, self.scaling = reader, arch, dtype, base, scaling
        self.head = head

    def __call__(self, unit: Unit) -> dict[str, Tensor]:
        if unit.kind == "head":
            name = "lm_head.weight" if "lm_head.weight" in self.head else "model.embed_tokens.weight"  # tied
            out = {"lm_head.weight": self.head[name]}
        else:
            out = self._saved(unit) if self.base is None else self._merged(unit)
            if self.head is not None:
                out = {f"model.{k}": v for k, v in out.items()}
        return {k: v.to(self.dtype).contiguous() for k, v in out.items()}

    def _saved(self, unit: Unit) -> dict[str, Tensor]:
        r = self.reader
        if unit.kind == "embed":
            return {"embed_tokens.weight": r.load("backbone.embedding.word_embeddings.weight")[: self.arch.vocab_size]}
        if unit.kind == "norm":
            return {"norm.weight": r.load("backbone.decoder.final_layernorm.weight")}
        part = {}
        for key in r.keys(LAYERS):
            name = key.removeprefix(LAYERS)
            part[SAVED_NORMS.get(name, name)] = r.load(key, layer=unit.layer)
        return {k.removeprefix("model."): v for k, v in megatron_layer_to_hf([part], self.arch, unit.layer).items()}

    def _merged(self, unit: Unit) -> dict[str, Tensor]:
        base = self.base
        if unit.kind == "embed":
            return {"embed_tokens.weight": base["model.embed_tokens.weight"]}
        if unit.kind == "norm":
            return {"norm.weight": base["model.norm.weight"]}
        prefix = f"model.layers.{unit.layer}."
        out = {k.removeprefix("model."): base[k] for k in base if k.startswith(prefix)}
        adapters = self.reader.keys(f"lora.layers.{unit.layer}.")
        loaded = {k: self.reader.load(k) for k in adapters}
        for target in sorted({k.split(".")[3] for k in adapters}):
            if target not in TARGETS:
                raise CheckpointError(f"{self.reader.folder}: unknown LoRA target {target!r}")
            a = loaded[f"lora.layers.{unit.layer}.{target}.lora_A"]
            b = loaded[f"lora.layers.{unit.layer}.{target}.lora_B"]
            name = f"layers.{unit.layer}.{HF_MODULE[target]}.{target}.weight"
            weight = out[name].to(self.dtype)
            out[name] = weight + (self.scaling * b @ a).to(weight.dtype)
        return out


def _heads(reader: CheckpointReader, cfg: RunConfig, index: int, arch: ModelArgs, previous: Path | None):
    """The pooling head and IEM (small): from the checkpoint where the stage trained them, else the
    previous stage's folder (a frozen IEM), else the fresh head of a parameter-free pooling."""
    pooling = Pooling(cfg.pooling, arch.hidden_size)
    saved = reader.keys("pooling.")
    if saved:
        pooling.load_state_dict({k.removeprefix("pooling."): reader.load(k) for k in saved})
    elif pooling.has_parameters:
        raise CheckpointError(f"{reader.folder}: pooling mode {cfg.pooling.mode!r} has weights, the checkpoint none")
    stage = cfg.stages[index]
    d2llm = stage.objective.d2llm
    hidden, scale = (d2llm.iem_hidden, d2llm.cosine_scale) if stage.objective.kind == "d2llm" else (0, 0.0)
    iem = None
    if not hidden and previous is not None:
        spec = load_spec(previous / SPEC_FILE)
        hidden, scale = spec.iem_hidden, spec.iem_cosine_scale
    if hidden:
        from safetensors.torch import load_file

        iem = InteractionEmulation(pooling.output_dim, hidden, scale)
        saved = reader.keys("iem.")
        state = {k.removeprefix("iem."): reader.load(k) for k in saved} if saved \
            else load_file(str(previous / IEM_FILE))
        iem.load_state_dict(state)
    return pooling, iem


def export_step_streaming(cfg: RunConfig, index: int, step_dir: Path, output: Path,
                          shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write stage `index`'s encoder folder (a teacher stage's: its causal-LM folder) from `step_dir` in
    one process (a torch.distributed group of one must exist: dist_checkpointing needs it)."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.model.path)
    hf_config = AutoConfig.from_pretrained(path)
    arch = ModelArgs.from_hf_config(hf_config, source=str(path / "config.json"))
    dtype = DTYPES[cfg.model.dtype]
    reader = CheckpointReader(step_dir / MODEL_DIR)
    previous = previous_final(RunLayout.of_stage_dir(step_dir.parent), cfg, index) if index > 0 else None
    stage = cfg.stages[index]
    teacher = stage.objective.kind == "teacher"  # (a teacher recipe's only stage: it starts from `path`)
    with contextlib.ExitStack() as files_open:  # the lazily read weight files, closed however this ends
        head = files_open.enter_context(HFWeights(path)) if teacher else None
        if reader.keys("lora."):
            if not stage.lora.enabled:
                raise CheckpointError(f"{step_dir}: holds LoRA adapters, but stage {stage.name} has lora.enabled=false")
            base = files_open.enter_context(HFWeights(previous, prefix="model.") if previous is not None
                                            else HFWeights(path))
            units = StepUnits(reader, arch, dtype, base, stage.lora.alpha / stage.lora.r, head)
        elif reader.keys("backbone."):
            units = StepUnits(reader, arch, dtype, None, 0.0, head)
        else:
            raise CheckpointError(f"{reader.folder}: neither backbone weights nor LoRA adapters")
        if teacher:
            return _write_teacher(output, units, hf_config, dtype, path, stage, shard_bytes)
        return _write_encoder(output, units, reader, cfg, index, hf_config, previous, path, shard_bytes)


def _write_encoder(output: Path, units: StepUnits, reader: CheckpointReader, cfg: RunConfig, index: int, hf_config,
                   previous: Path | None, path: Path, shard_bytes: int) -> Path:
    """The stage's encoder folder, as its end writes it (`hf_export.export_encoder_folder`)."""
    from transformers import AutoTokenizer

    arch, dtype = units.arch, units.dtype
    pooling, iem = _heads(reader, cfg, index, arch, previous)
    spec = EncoderSpec(pooling=cfg.pooling, max_length=serving_length(cfg, hf_config), bidirectional=True,
                       iem_hidden=iem.hidden if iem is not None else 0,
                       iem_cosine_scale=iem.cosine_scale if iem is not None else 0.0)
    element_size = torch.tensor([], dtype=dtype).element_size()
    files = plan_shards(arch, 1, element_size, shard_bytes)
    with atomic_dir(output) as tmp:
        for shard in files:
            write_shard_file(tmp, shard, dtype, units)
        write_heads(tmp, pooling, iem)
        write_config(tmp, hf_config, dtype)
        if len(files) > 1:
            (tmp / INDEX).write_text(index_json(files, element_size))
        write_folder_files(tmp, prepare_tokenizer(AutoTokenizer.from_pretrained(path)), spec)
    return output


def _write_teacher(output: Path, units: StepUnits, hf_config, dtype: torch.dtype, path: Path, stage, shard_bytes: int):
    """A teacher stage's step as the causal-LM folder its end would write (`export_teacher_folder`)."""
    from transformers import AutoTokenizer

    element_size = torch.tensor([], dtype=dtype).element_size()
    files = plan_shards(units.arch, 1, element_size, shard_bytes, causal_lm=True)
    objective = stage.objective.teacher
    with atomic_dir(output) as tmp:
        for shard in files:
            write_shard_file(tmp, shard, dtype, units)
        write_causal_config(tmp, hf_config, dtype)
        if len(files) > 1:
            (tmp / INDEX).write_text(index_json(files, element_size))
        prepare_tokenizer(AutoTokenizer.from_pretrained(path)).save_pretrained(tmp)
        write_teacher_spec(tmp, objective.stage_prompt(stage.data.max_length), objective.symmetric_tasks)
    return output
