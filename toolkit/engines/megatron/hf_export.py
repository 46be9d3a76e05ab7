"""The megatron engine's encoder folder, written by the ranks that hold the weights (no rank holds the model).

The backbone is written as a sharded HF checkpoint (`model-0000X-of-0000N.safetensors` +
`model.safetensors.index.json`; a single `model.safetensors` when one file holds it). The files are planned from the architecture alone (`plan_shards`),
so every rank knows every file's name and tensor list before any weight moves; a file never spans
two pipeline stages. Each stage's DP-replica-0 ranks then walk their stage unit by unit (the
embedding, one decoder layer, the final norm): the TP pieces of one unit are gathered to the
stage's TP rank 0 with `dist.gather` (tensors, not pickles), converted to HF names and streamed into
the open file (`SafetensorsWriter`: the header is known from the plan, so no file is assembled in
memory). Memory bound of a writing rank beyond its own shard: the model's largest unit (a layer,
or the embedding at its TP-padded size) twice (the gathered pieces and their conversion); other
ranks send one parameter at a time (bench/export_memory.py measures it per rank). The heads (pooling, IEM) are written by the last stage that holds them;
rank 0 writes config, tokenizer, index and the sentence-transformers files. The folder is built in a
temp sibling that rank 0 renames into place once every rank succeeded, so it appears whole or not
at all. Such a folder loads with `AutoModel`, `SentenceTransformer` and `Encoder.from_pretrained`.
A teacher stage's folder is the causal LM instead (`causal_lm`: `model.` names and the LM head as the
last stage's last unit), with its prompt, for `embedforge teacher score`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from toolkit.atomic import atomic_dir
from toolkit.config import TeacherPrompt
from toolkit.engines.base import any_rank
from toolkit.engines.megatron.convert import hf_layer_shapes, megatron_layer_to_hf
from toolkit.engines.megatron.weights import INDEX, SINGLE
from toolkit.models.arch import ModelArgs
from toolkit.models.bidirectional import make_bidirectional
from toolkit.models.export import write_folder_files, write_heads
from toolkit.models.teacher_folder import write_teacher_spec

DEFAULT_SHARD_BYTES = 5 * 2**30  # per file; only the file count depends on it, never the memory
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Unit:
    """What one gather moves: the embedding, one decoder layer or the final norm, of one pipeline stage."""

    kind: str  # "embed" | "layer" | "norm" | "head" (a causal LM's, last stage)
    stage: int
    layer: int = -1


def unit_shapes(arch: ModelArgs, unit: Unit, causal_lm: bool = False) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of a unit: as `AutoModel` stores them (no `model.` prefix), or with
    `causal_lm` as `AutoModelForCausalLM` does (`model.` backbone, `lm_head.weight`)."""
    if unit.kind == "head":
        return {"lm_head.weight": (arch.vocab_size, arch.hidden_size)}
    if unit.kind == "embed":
        shapes = {"embed_tokens.weight": (arch.vocab_size, arch.hidden_size)}
    elif unit.kind == "norm":
        shapes = {"norm.weight": (arch.hidden_size,)}
    else:
        shapes = {k.removeprefix("model."): v for k, v in hf_layer_shapes(arch, unit.layer).items()}
    return {f"model.{k}": v for k, v in shapes.items()} if causal_lm else shapes


@dataclass
class ShardFile:
    name: str
    stage: int
    units: list[Unit] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # in file order


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_shards(arch: ModelArgs, pp: int, element_size: int, shard_bytes: int = DEFAULT_SHARD_BYTES,
                split: tuple[int, int] = (0, 0), causal_lm: bool = False) -> list[ShardFile]:
    """The backbone files, filled greedily up to `shard_bytes` per file (a unit is never split, a file
    never spans two pipeline stages): the same list on every rank, from the architecture and the
    pipeline split (`split`: first / last stage layers, 0 = even) alone; `causal_lm` adds the LM head
    after the final norm (a teacher's folder)."""
    files: list[ShardFile] = []
    for stage in range(pp):
        units = [Unit("embed", stage)] if stage == 0 else []
        units += [Unit("layer", stage, i) for i in arch.stage_layers(pp, stage, *split)]
        units += [Unit("norm", stage)] if stage == pp - 1 else []
        units += [Unit("head", stage)] if stage == pp - 1 and causal_lm else []
        current, size = None, 0
        for unit in units:
            shapes = unit_shapes(arch, unit, causal_lm)
            nbytes = sum(_numel(s) for s in shapes.values()) * element_size
            if current is None or (size + nbytes > shard_bytes and current.units):
                current, size = ShardFile("", stage), 0
                files.append(current)
            current.units.append(unit)
            current.shapes.update(shapes)
            size += nbytes
    for i, f in enumerate(files):  # one file: `model.safetensors` and no index, as `save_pretrained` names it
        f.name = SINGLE if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
    return files


def index_json(files: list[ShardFile], element_size: int) -> str:
    total = sum(_numel(s) for f in files for s in f.shapes.values()) * element_size
    weight_map = {name: f.name for f in files for name in f.shapes}
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)


# ------------------------------------------------------------------------------------------ the writer
class SafetensorsWriter:
    """A safetensors file written tensor by tensor: the header (names, shapes, dtype, offsets) comes from
    the plan, then each tensor's bytes in header order, so only the tensor being written is in memory."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype):
        self.path, self.shapes, self.dtype = path, shapes, dtype
        size = torch.tensor([], dtype=dtype).element_size()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in shapes.items():
            n = _numel(shape) * size
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._order = list(shapes)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: Tensor) -> None:
        expected = self._order.pop(0) if self._order else None
        if name != expected or tuple(tensor.shape) != self.shapes[name] or tensor.dtype != self.dtype:
            raise RuntimeError(f"{self.path.name}: got {name} {tuple(tensor.shape)} {tensor.dtype}, the plan expects "
                               f"{expected} {self.shapes.get(expected)} {self.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        self._file.write(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no bytes copy

    def abort(self) -> None:
        self._file.close()

    def close(self) -> None:
        self._file.close()
        if self._order:
            raise RuntimeError(f"{self.path.name}: {len(self._order)} planned tensors were not written, e.g. {self._order[0]}")


def write_shard_file(folder: Path, shard: ShardFile, dtype: torch.dtype,
                     unit_tensors: Callable[[Unit], dict[str, Tensor] | None]) -> None:
    """One planned file; `unit_tensors(unit)` returns the unit's HF tensors (None on a rank that only
    helps gather: it then writes nothing, but is called for every unit so collectives line up)."""
    writer = None
    try:
        for unit in shard.units:
            tensors = unit_tensors(unit)
            if tensors is None:
                continue
            if writer is None:
                writer = SafetensorsWriter(folder / shard.name, shard.shapes, dtype)
            names = unit_shapes_order(shard, unit, tensors)
            for name in names:
                writer.write(name, tensors.pop(name))
    except BaseException:
        if writer is not None:
            writer.abort()  # the temp folder is removed; no completeness check to mask the error
        raise
    if writer is not None:
        writer.close()


def unit_shapes_order(shard: ShardFile, unit: Unit, tensors: dict[str, Tensor]) -> list[str]:
    """The unit's names in file order; the converter must have produced exactly those."""
    names = [n for n in shard.shapes if n in tensors]
    if len(names) != len(tensors):
        raise RuntimeError(f"{shard.name}: {unit} produced tensors the plan does not list: "
                           f"{sorted(set(tensors) - set(names))[:3]}")
    return names


def write_causal_config(folder: Path, hf_config, dtype: torch.dtype) -> None:
    """config.json as `AutoModelForCausalLM(...).save_pretrained` writes it, the head untied (its own tensor)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf_config)
    config.tie_word_embeddings = False
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(config, dtype=dtype)
    causal.config.dtype = str(dtype).split(".")[1]
    causal.config.architectures = [causal.__class__.__name__]
    causal.config.save_pretrained(folder)


def write_config(folder: Path, hf_config, dtype: torch.dtype) -> None:
    """config.json as `AutoModel(...).save_pretrained` writes it, bidirectional (built on meta: no weights)."""
    from transformers import AutoModel

    with torch.device("meta"):
        backbone = AutoModel.from_config(copy.deepcopy(hf_config), dtype=dtype)
    make_bidirectional(backbone)
    backbone.config.dtype = str(dtype).split(".")[1]
    backbone.config.architectures = [backbone.__class__.__name__]
    backbone.config.save_pretrained(folder)


# ------------------------------------------------------------------------------------------ distributed
def _tp_gather(t: Tensor, group, tp: int, tp_rank: int) -> list[Tensor] | None:
    """Every TP rank's piece of one parameter on TP rank 0 (in TP order), None elsewhere."""
    if tp == 1:
        return [t.detach()]
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(tp)] if tp_rank == 0 else None
    dist.gather(t, parts, dst=dist.get_global_rank(group, 0), group=group)
    return parts


@contextlib.contextmanager
def shared_atomic_dir(final: Path, rank: int, world: int) -> Iterator[Path]:
    """`atomic_dir` across ranks: rank 0 makes the temp sibling and renames it once every rank
    succeeded (an all-reduced flag); on any failure it is removed and every rank raises."""
    if world == 1 or not dist.is_initialized():
        with atomic_dir(final) as tmp:
            yield tmp
        return
    ctx = atomic_dir(final) if rank == 0 else None
    path = [str(ctx.__enter__()) if ctx is not None else None]
    dist.broadcast_object_list(path, src=0)  # a path string, not weights
    error: BaseException | None = None
    try:
        yield Path(path[0])
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the ranks agreed
        error = exc
    failed = any_rank(error is not None)
    if ctx is not None:
        try:
            if failed:
                ctx.__exit__(RuntimeError, RuntimeError("export failed"), None)
            else:
                ctx.__exit__(None, None, None)  # the rename into place
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the ranks agreed
            error = error or exc
    failed = any_rank(error is not None)  # also a barrier: no rank reads `final` before it is in place
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{final}: another rank failed while writing it (see its log)")


@dataclass
class StageWeights:
    """What one rank contributes: its megatron module, which of its parameters are TP-sharded, its place."""

    model: torch.nn.Module
    sharded: set[str]
    arch: ModelArgs
    tp: int
    tp_rank: int
    pp: int
    pp_rank: int
    tp_group: object = None
    split: tuple[int, int] = (0, 0)  # first / last pipeline stage layers (0 = even)
    causal_lm: bool = False  # HF causal-LM names and the LM head (a teacher's folder)

    def unit_tensors(self, unit: Unit) -> dict[str, Tensor] | None:
        """The unit's HF tensors on TP rank 0 (gathered layer by layer), None on the other TP ranks."""
        tensors = self._backbone_unit_tensors(unit)
        if tensors is None or not self.causal_lm or unit.kind == "head":
            return tensors
        return {f"model.{k}": v for k, v in tensors.items()}

    def _backbone_unit_tensors(self, unit: Unit) -> dict[str, Tensor] | None:
        params = dict(self.model.named_parameters())
        arch = self.arch

        def pieces(name: str) -> list[Tensor] | None:
            p = params[name]
            if name in self.sharded:
                return _tp_gather(p, self.tp_group, self.tp, self.tp_rank)
            return [p.detach()] * self.tp if self.tp_rank == 0 else None

        if unit.kind == "head":  # vocabulary-parallel, padded like the embedding
            parts = pieces("output_layer.weight")
            return None if parts is None else {"lm_head.weight": torch.cat(parts)[: arch.vocab_size]}
        if unit.kind == "embed":
            parts = pieces("embedding.word_embeddings.weight")
            return None if parts is None else {"embed_tokens.weight": torch.cat(parts)[: arch.vocab_size]}
        if unit.kind == "norm":
            parts = pieces("decoder.final_layernorm.weight")
            return None if parts is None else {"norm.weight": parts[0]}
        prefix = f"decoder.layers.{unit.layer - arch.stage_layers(self.pp, self.pp_rank, *self.split).start}."
        by_rank: list[dict[str, Tensor]] = [{} for _ in range(self.tp)]
        for name in sorted(n for n in params if n.startswith(prefix)):
            parts = pieces(name)
            if parts is not None:
                for t, piece in enumerate(parts):
                    by_rank[t][name.removeprefix(prefix)] = piece.cpu()
        if self.tp_rank != 0:
            return None
        return {k.removeprefix("model."): v for k, v in megatron_layer_to_hf(by_rank, arch, unit.layer).items()}


def export_encoder_folder(final_dir: Path, weights: StageWeights, *, dp_rank: int, rank: int, world: int,
                          hf_config, dtype: torch.dtype, tokenizer, spec, pooling, iem,
                          shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the encoder folder from every rank's shards (a collective over the world: call it on all
    ranks). `pooling` / `iem` are this rank's heads (used only on the last stage's writer)."""
    with _sharded_folder(final_dir, weights, dp_rank, rank, world, dtype, shard_bytes) as tmp:
        if dp_rank == 0 and weights.pp_rank == weights.pp - 1 and weights.tp_rank == 0:
            write_heads(tmp, pooling, iem)
        if rank == 0:
            write_config(tmp, hf_config, dtype)
            write_folder_files(tmp, tokenizer, spec)
    return Path(final_dir)


def export_teacher_folder(final_dir: Path, weights: StageWeights, *, dp_rank: int, rank: int, world: int,
                          hf_config, dtype: torch.dtype, tokenizer, prompt: TeacherPrompt,
                          symmetric_tasks: list[str], shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a fine-tuned teacher's causal-LM folder (backbone + its own LM head, untied: the head is
    a frozen copy while the embeddings may have trained) with the prompt it learned; collective."""
    if not weights.causal_lm:
        raise ValueError("export_teacher_folder: the weights must be planned with causal_lm=True")
    with _sharded_folder(final_dir, weights, dp_rank, rank, world, dtype, shard_bytes) as tmp:
        if rank == 0:
            write_causal_config(tmp, hf_config, dtype)
            tokenizer.save_pretrained(tmp)
            write_teacher_spec(tmp, prompt, symmetric_tasks)
    return Path(final_dir)


@contextlib.contextmanager
def _sharded_folder(final_dir: Path, weights: StageWeights, dp_rank: int, rank: int, world: int,
                    dtype: torch.dtype, shard_bytes: int) -> Iterator[Path]:
    """The shared temp folder with this rank's planned backbone files (and rank 0's index) written;
    the caller adds the rest, and the folder appears once every rank succeeded."""
    element_size = torch.tensor([], dtype=dtype).element_size()
    files = plan_shards(weights.arch, weights.pp, element_size, shard_bytes, weights.split, weights.causal_lm)
    with shared_atomic_dir(Path(final_dir), rank, world) as tmp:
        if dp_rank == 0:  # the other DP replicas hold copies
            for shard in files:
                if shard.stage == weights.pp_rank:
                    write_shard_file(tmp, shard, dtype, weights.unit_tensors)
        if rank == 0 and len(files) > 1:
            (tmp / INDEX).write_text(index_json(files, element_size))
        yield tmp
