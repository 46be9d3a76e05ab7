"""Our encoders behind mteb v2's encoder protocol, so every task is scored the way the leaderboard does it.

- Instructions per task (`instructions.json`: the LLM2Vec / E5 set, overridable by a user file) go to
  queries and symmetric-task texts only; passages (`PromptType.document`) never get one.
- Texts are encoded in length order (little padding) and returned in input order; under
  torch.distributed with world > 1 each rank encodes one contiguous slice of the sorted texts and
  the slices are all-gathered back, so every rank returns the same full matrix.
- A D2LLM student (an Encoder with an IEM) scores pairs with its Interaction Emulation Module:
  `similarity` / `similarity_pairwise` use the asymmetric branch while a retrieval-like task is being
  encoded, the symmetric one otherwise; its embeddings are the raw pooled vectors the IEM was trained on.
- The model is loaded on the first `encode`, so a run whose results are all cached loads nothing.
- With a `progress` (rank 0 of `eval run`), each encode call reports its task and texts done on stderr.
- `ModelMeta.name` names the run/stage (or folder) and `revision` the checkpoint, so mteb's
  ResultCache keeps one result per checkpoint; a non-default instruction set becomes an mteb
  "experiment" (its own sub-folder), never mixed with the default one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from toolkit.engines.megatron.encoder import BATCHES_PER_SCHEDULE
from toolkit.errors import InputError, MissingPathError
from toolkit.eval.progress import EncodeProgress

DEFAULT_INSTRUCTIONS = Path(__file__).with_name("instructions.json")
# task types whose pairs are (query, passage): the IEM's asymmetric branch scores them
ASYMMETRIC_TYPES = frozenset({"Retrieval", "Reranking", "InstructionRetrieval", "InstructionReranking"})
# batches encoded between two progress reports: a whole number of megatron pipeline windows, so every rank
# of a TP x PP group (each with its progress, silent but on rank 0) runs the same schedules
PROGRESS_BATCHES = BATCHES_PER_SCHEDULE


# ----------------------------------------------------------------------------- instructions
class Instructions:
    """Task name -> instruction, then task type -> instruction, then the task's own mteb prompt."""

    def __init__(self, override: str | Path | None = None, default: str | Path = DEFAULT_INSTRUCTIONS):
        base = _read_table(Path(default))
        self.override_path = Path(override) if override else None
        extra = _read_table(self.override_path) if self.override_path else {"tasks": {}, "task_types": {}}
        self.tasks = {**base["tasks"], **extra["tasks"]}
        self.task_types = {**base["task_types"], **extra["task_types"]}
        self._extra = extra

    def resolve(self, task_metadata: Any, prompt_type: PromptType | None = None) -> str | None:
        """The instruction for these texts; None for passages and where nothing applies ("" means none)."""
        if prompt_type == PromptType.document:
            return None
        name, kind = task_metadata.name, task_metadata.type
        if name in self.tasks:
            return self.tasks[name] or None
        prompt = task_metadata.prompt  # mteb's own (E5-style) prompt for tasks our table lacks
        if isinstance(prompt, dict):
            prompt = prompt.get(PromptType.query.value)
        if prompt:
            return prompt
        return self.task_types.get(kind) or None

    @property
    def digest(self) -> str | None:
        """Short hash of the override (None without one): the cache's experiment key."""
        if self.override_path is None:
            return None
        blob = json.dumps(self._extra, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


def _read_table(path: Path) -> dict[str, dict[str, str]]:
    """{"tasks": {...}, "task_types": {...}} or a flat {"TaskName": "instruction"} map."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingPathError(f"{path}: instruction file not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object of task name -> instruction")
    if "tasks" in data or "task_types" in data:
        table = {"tasks": dict(data.get("tasks", {})), "task_types": dict(data.get("task_types", {}))}
    else:
        table = {"tasks": {k: v for k, v in data.items() if not k.startswith("_")}, "task_types": {}}
    for section, entries in table.items():
        for key, value in entries.items():
            if not isinstance(value, str):
                raise InputError(f"{path}: {section}.{key} must be a string, got {type(value).__name__}")
    return table


# ----------------------------------------------------------------------------- backends
@dataclass
class Backend:
    """What the wrapper needs from a loaded model: encode, a length key to sort by, its width, an IEM."""

    encode: Callable[[list[str], "str | None", int], np.ndarray]
    lengths: Callable[[list[str], "str | None"], np.ndarray]
    dim: int
    iem: torch.nn.Module | None = None
    n_parameters: int | None = None


def encoder_backend(encoder: Any) -> Backend:
    """An Embedforge Encoder; a D2LLM student keeps raw embeddings (its IEM was trained on them)."""
    normalize = encoder.iem is None

    def encode(texts: list[str], instruction: str | None, batch_size: int) -> np.ndarray:
        return encoder.encode(texts, instruction=instruction, batch_size=batch_size, normalize=normalize)

    def lengths(texts: list[str], instruction: str | None) -> np.ndarray:
        prompt = encoder.format_instruction(instruction)
        return np.asarray([len(ids) for ids in encoder.tokenizer([prompt + t for t in texts])["input_ids"]])

    return Backend(encode, lengths, encoder.pooling.output_dim, encoder.iem,
                   sum(p.numel() for p in encoder.parameters()))


def sentence_transformer_backend(model: Any) -> Backend:
    """A SentenceTransformer (the all-MiniLM-L6-v2 baseline): not instruction-trained, so none is added."""

    def encode(texts: list[str], instruction: str | None, batch_size: int) -> np.ndarray:
        return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False)

    def lengths(texts: list[str], instruction: str | None) -> np.ndarray:
        return np.asarray([len(t) for t in texts])

    dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return Backend(encode, lengths, dim(), None, sum(p.numel() for p in model.parameters()))


# ----------------------------------------------------------------------------- sharded encoding
def _dist_info(group: Any = None) -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    return 1, 0


def shard_bounds(n: int, world: int) -> list[int]:
    """Contiguous slice boundaries of n sorted items over `world` ranks (sizes differ by at most 1)."""
    return [n * r // world for r in range(world + 1)]


def all_gather_rows(local: np.ndarray, counts: Sequence[int], group: Any = None) -> np.ndarray:
    """Rank-ordered concatenation of every rank's rows (padded to equal size for the collective)."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    buf = torch.zeros((max(counts), local.shape[1]), dtype=torch.float32, device=device)
    buf[: len(local)] = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32)).to(device)
    parts = [torch.empty_like(buf) for _ in counts]
    dist.all_gather(parts, buf, group=group)
    return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts)])


def sharded_encode(backend: Backend, texts: Sequence[str], instruction: str | None, batch_size: int,
                   group: Any = None, progress: EncodeProgress | None = None) -> np.ndarray:
    """Embeddings [n, dim] in input order: longest first, one contiguous slice of the sorted texts per
    rank, gathered back. Empty texts (which the Encoder refuses) get a zero row. `progress` hears of this
    rank's slice as it goes, scaled to all texts."""
    texts = list(texts)
    out = np.zeros((len(texts), backend.dim), dtype=np.float32)
    keep = np.asarray([i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()], dtype=np.int64)
    if not len(keep):
        return out
    kept = [texts[i] for i in keep]
    order = np.argsort(-backend.lengths(kept, instruction), kind="stable")
    world, rank = _dist_info(group)
    bounds = shard_bounds(len(order), world)
    mine = order[bounds[rank] : bounds[rank + 1]]
    local = (_encode_reporting(backend, [kept[i] for i in mine], instruction, batch_size, progress, len(texts))
             if len(mine) else np.zeros((0, backend.dim), dtype=np.float32))
    if world > 1:
        local = all_gather_rows(np.asarray(local), np.diff(bounds).tolist(), group)
    out[keep[order]] = local
    return out


def _encode_reporting(backend: Backend, texts: list[str], instruction: str | None, batch_size: int,
                      progress: EncodeProgress | None, total: int) -> np.ndarray:
    """backend.encode over length-sorted texts, in chunks of PROGRESS_BATCHES batches when `progress`
    listens (chunk borders fall on batch borders: the same batches, the same embeddings)."""
    if progress is None:
        return backend.encode(texts, instruction, batch_size)
    chunk, parts = batch_size * PROGRESS_BATCHES, []
    for start in range(0, len(texts), chunk):
        parts.append(np.asarray(backend.encode(texts[start : start + chunk], instruction, batch_size)))
        progress.advance(round(total * min(start + chunk, len(texts)) / len(texts)))
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- the mteb model
def make_meta(name: str, revision: str, *, instructions: Instructions | None = None, use_instructions: bool = True,
              similarity: ScoringFunction | None = ScoringFunction.COSINE, base: ModelMeta | None = None,
              loader: Callable[..., Any] | None = None, loader_kwargs: dict[str, Any] | None = None) -> ModelMeta:
    """A ModelMeta for the cache: `name` = run/stage or folder, `revision` = checkpoint (step-N, final, hash).

    `loader(name, revision, **loader_kwargs)` rebuilds the model, so `meta.load_model()` works too and
    the cache's model_meta.json records where the model came from (loader_kwargs: the spec)."""
    digest = instructions.digest if instructions is not None and use_instructions else None
    extra = {"experiment_kwargs": {"instructions": digest}} if digest else {}
    if base is not None:  # a registered mteb model (MiniLM): keep its identity, swap in our loader
        return base.model_copy(update={"loader": loader, "loader_kwargs": loader_kwargs or {}, **extra}, deep=True)
    return ModelMeta.create_empty(dict(name=name, revision=revision, framework=["PyTorch", "Sentence Transformers"],
                                       similarity_fn_name=similarity, use_instructions=use_instructions,
                                       open_weights=True, loader=loader, loader_kwargs=loader_kwargs or {}, **extra))


class EmbedforgeModel(AbsEncoder):
    """mteb v2 encoder over a lazily loaded Backend (Encoder folder, D2LLM student, MiniLM)."""

    def __init__(self, load: Callable[[], Backend], meta: ModelMeta, instructions: Instructions | None = None,
                 batch_size: int = 32, group: Any = None):
        self._load, self._backend = load, None
        self.mteb_model_meta = meta
        self.instructions = instructions or Instructions()
        self.batch_size, self.group = batch_size, group
        self.encode_calls = 0
        self.texts_encoded = 0
        self._symmetric = True
        self.progress: EncodeProgress | None = None  # `eval run` sets one on rank 0

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = self._load()
        return self._backend

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        texts = [t for batch in inputs for t in batch["text"]]
        use = self.mteb_model_meta.use_instructions is not False
        instruction = self.instructions.resolve(task_metadata, prompt_type) if use else None
        self._symmetric = task_metadata.type not in ASYMMETRIC_TYPES
        self.encode_calls += 1
        self.texts_encoded += len(texts)
        if self.progress is not None:
            kind = f", {prompt_type.value}s" if prompt_type is not None else ""
            self.progress.begin(task_metadata.name, f"({hf_split}{kind})", len(texts))
        return sharded_encode(self.backend, texts, instruction, int(kwargs.get("batch_size") or self.batch_size),
                              self.group, self.progress)

    def encode_texts(self, texts: Sequence[str], instruction: str | None = None) -> np.ndarray:
        """Plain entry point (no task metadata) over the same sharded, length-sorted path."""
        return sharded_encode(self.backend, texts, instruction, self.batch_size, self.group)

    # -------------------------------------------------------------- similarity (IEM for students)
    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        if not self.loaded or self.backend.iem is None:
            return super().similarity(embeddings1, embeddings2)
        return iem_scores(self.backend.iem, embeddings1, embeddings2, self._symmetric, pairwise=False)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Any:
        if not self.loaded or self.backend.iem is None:
            return super().similarity_pairwise(embeddings1, embeddings2)
        return iem_scores(self.backend.iem, embeddings1, embeddings2, self._symmetric, pairwise=True)


@torch.inference_mode()
def iem_scores(iem: torch.nn.Module, y1: Any, y2: Any, symmetric: bool, pairwise: bool,
               block: int = 64) -> torch.Tensor:
    """IEM logits: [n1, n2] for every pair (queries in blocks, decomposed projections), or [n] pairwise."""
    device = next(iem.parameters()).device  # the student's device (a GPU under `eval run` on one)

    def as_2d(y: Any) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y, dtype=np.float32)).to(device)
        return t[None] if t.ndim == 1 else t

    u_q, u_p = iem.query_proj(as_2d(y1)), iem.passage_proj(as_2d(y2))
    if pairwise:
        return iem.score_proj(u_q, u_p, symmetric)[0].cpu()
    rows = [iem.score_proj(u_q[s : s + block, None], u_p[None], symmetric)[0] for s in range(0, len(u_q), block)]
    return torch.cat(rows).cpu() if rows else torch.zeros((0, len(u_p)))
