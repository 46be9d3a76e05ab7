"""Task selection and cached evaluation through `mteb.evaluate`: the one path for local and real MTEB tasks.

Results go through mteb's ResultCache (`<cache>/results/<name>/<revision>/<Task>.json`) with
`only-missing`, so an interrupted sweep continues where it stopped and a finished one computes nothing
(the model is not even loaded). Model specs: an encoder folder (a stage's `final/`, an export), a
`step-N/` checkpoint (consolidated once into `<work_dir>/<hash of its path>`), or `minilm`.

Real MTEB tasks (`STSBenchmark`, `--benchmark "MTEB(eng, v2)"`) resolve from mteb's registry without
downloading anything; running them needs the Hugging Face hub (set HF_HUB_OFFLINE=0 where it is
reachable) or a pre-filled HF datasets cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import mteb
from mteb.abstasks import AbsTask
from mteb.cache import ResultCache
from mteb.models.model_meta import ScoringFunction

from toolkit.assets import cache_dir, minilm_dir
from toolkit.distributed.device import resolve_device
from toolkit.distributed.parallel_dims import ParallelDims
from toolkit.engines.export import consolidate
from toolkit.engines.megatron.encoder import MegatronEncoder
from toolkit.errors import InputError, MissingPathError
from toolkit.eval.mteb_model import (
    EmbedforgeModel,
    Instructions,
    encoder_backend,
    make_meta,
    sentence_transformer_backend,
)
from toolkit.eval.mteb_tasks import ALIASES, LOCAL_MTEB_TASKS, local_task
from toolkit.eval.sweep_report import ResultRow
from toolkit.models.encoder import Encoder
from toolkit.models.folder import SPEC_FILE
from toolkit.run_layout import COMPLETE, FINAL_DIR, RunLayout, parse_stage_dir, parse_step_dir

if TYPE_CHECKING:
    from toolkit.eval.sweep import SweepJob

log = logging.getLogger(__name__)

MINILM = "minilm"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SCORE_DIGITS = 6  # mteb's TaskResult.to_disk rounding


# ----------------------------------------------------------------------------- tasks
def select_tasks(names: Sequence[str] | None = None, task_types: Sequence[str] | None = None,
                 languages: Sequence[str] | None = None, benchmark: str | None = None,
                 local: bool = True, sizes: Mapping[str, Mapping[str, int]] | None = None) -> list[AbsTask]:
    """Task objects (no data loaded) in a stable order, duplicates dropped.

    `names` (local names/aliases first, then mteb's registry) and `benchmark` select explicitly; with
    neither, the candidates are our local tasks (`local=True`) or mteb's whole registry. `task_types`
    and `languages` (ISO 639-3, e.g. "eng") then filter the candidates. `sizes` ({local task name or
    alias: {"n_test": 200}}) size the selected local tasks (`mteb_tasks.local_task`).
    """
    merged: dict[str, dict[str, int]] = {}  # an alias and the mteb name of one task size it together
    for key, values in (sizes or {}).items():
        merged.setdefault(ALIASES.get(key, key), {}).update(values)
    sizes = merged
    unknown = sorted(set(sizes) - set(LOCAL_MTEB_TASKS))
    if unknown:
        raise InputError(f"task size for {unknown[0]!r}: only local tasks are sized ({', '.join(LOCAL_MTEB_TASKS)})")
    chosen: list[AbsTask] = []
    for name in names or ():
        if local and (name in LOCAL_MTEB_TASKS or name in ALIASES):
            chosen.append(local_task(name, **sizes.get(ALIASES.get(name, name), {})))
            continue
        try:
            chosen.append(mteb.get_task(name))
        except KeyError:
            known = ", ".join([*LOCAL_MTEB_TASKS, *ALIASES])
            raise InputError(f"unknown task {name!r}: not a local task ({known}) nor in mteb's registry") from None
    if benchmark:
        try:
            chosen.extend(mteb.get_benchmark(benchmark).tasks)
        except (KeyError, ValueError) as exc:
            raise InputError(f"unknown benchmark {benchmark!r} ({exc})") from None
    if not names and not benchmark:
        chosen = [local_task(n, **sizes.get(n, {})) for n in LOCAL_MTEB_TASKS] if local else list(mteb.get_tasks())
    if task_types or languages:
        chosen = list(mteb.filter_tasks(chosen, task_types=task_types or None, languages=languages or None))
    seen: set[str] = set()
    unique = [t for t in chosen if not (t.metadata.name in seen or seen.add(t.metadata.name))]
    if not unique:
        raise InputError(f"no task matches names={names} types={task_types} languages={languages} benchmark={benchmark}")
    unsized = sorted(set(sizes) - {t.metadata.name for t in unique})
    if unsized:
        raise InputError(f"task size for {unsized[0]}: the task is not among the selected ones")
    return unique


# ----------------------------------------------------------------------------- models
def folder_revision(folder: Path, sample: int = 16 * 2**20) -> str:
    """Content hash of a folder (names, sizes and bytes; files over 2*sample hashed by head and tail)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(folder)}:{size}\n".encode())
        with path.open("rb") as fh:
            if size <= 2 * sample:
                h.update(fh.read())
            else:
                h.update(fh.read(sample))
                fh.seek(size - sample)
                h.update(fh.read(sample))
    return "sha-" + h.hexdigest()[:12]


def checkpoint_identity(path: Path) -> tuple[str, str]:
    """(name, revision) for the cache: `<run>/<NN-stage>` and `step-N-<key>` / `final-<key>`, other
    folders by content. The key hashes the checkpoint's absolute path and what marks this training of
    it (the COMPLETE marker's time and meta, or the final folder's content), so retraining into the
    same output_dir, or another run of the same name, never reads the old scores."""
    path = path.resolve()
    stage, run = path.parent, RunLayout.of_stage_dir(path.parent)
    if parse_stage_dir(stage) and run.is_run() and (path.name == FINAL_DIR or parse_step_dir(path) is not None):
        return f"{run.root.name}/{stage.name}", f"{path.name}-{_training_key(path)}"
    return f"embedforge/{path.name}", folder_revision(path)


def _training_key(path: Path) -> str:
    h = hashlib.sha256(str(path).encode())
    complete = path / COMPLETE
    if complete.is_file():  # a step-N/: written once per training, atomically
        h.update(f"{complete.stat().st_mtime_ns}".encode())
        meta = path / "meta.json"
        h.update(meta.read_bytes() if meta.is_file() else b"")
    else:
        h.update(folder_revision(path).encode())
    return h.hexdigest()[:8]


def default_work_dir() -> Path:
    return cache_dir() / "eval-checkpoints"


def consolidated_folder(step_dir: Path, work_dir: Path | None = None) -> Path:
    """A `step-N/` checkpoint as an encoder folder, built once (keyed by the checkpoint's absolute path)."""
    import torch.distributed as dist

    step_dir = step_dir.resolve()
    key = _training_key(step_dir)  # a retrained step-N/ is consolidated anew
    out = (work_dir or default_work_dir()) / f"{step_dir.parent.name}-{step_dir.name}-{key}"
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not (out / SPEC_FILE).is_file() and (not multi or dist.get_rank() == 0):
        import fcntl

        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_name(out.name + ".lock"), "w") as lock:  # sweep workers sharing a machine build it once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / SPEC_FILE).is_file():
                consolidate(step_dir, out)
    if multi:
        dist.barrier()
    return out


def load_model(spec: str, *, instructions: Instructions | str | Path | None = None, batch_size: int = 32,
               work_dir: Path | None = None, device: str = "cpu", tp: int = 1, pp: int = 1) -> EmbedforgeModel:
    """An mteb model for `spec` ("minilm", an encoder folder or a step-N checkpoint); weights load lazily.

    `tp` x `pp` > 1 (every rank of the process group calling this alike): each group of tp x pp ranks
    holds the backbone as megatron stages (`MegatronEncoder`: each rank reads only its slices) and the
    texts are sharded over the groups. A step-N/ is first written as an encoder folder in `work_dir`
    by one rank (`consolidated_folder`: a megatron checkpoint is streamed a unit at a time, at most two
    layers in memory; an hf / deepspeed one is rebuilt whole in that process), then loaded as stages."""
    table = instructions if isinstance(instructions, Instructions) else Instructions(instructions)
    dims = _model_parallel_dims(spec, tp, pp)
    if spec == MINILM:
        def load_minilm():
            from sentence_transformers import SentenceTransformer

            return sentence_transformer_backend(SentenceTransformer(str(minilm_dir()), device=device))

        base = mteb.get_model_meta(MINILM_NAME)  # mteb's own name + revision: comparable with the leaderboard
        meta = make_meta(MINILM_NAME, base.revision, base=base, loader=mteb_loader, loader_kwargs={"spec": MINILM})
        return EmbedforgeModel(load_minilm, meta, table, batch_size)
    path = Path(spec)
    if (path / SPEC_FILE).is_file():
        folder = path
    elif (path / COMPLETE).is_file():
        folder = None
    else:
        raise MissingPathError(f"{spec}: not 'minilm', an encoder folder ({SPEC_FILE}) or a complete step-N checkpoint")
    name, revision = checkpoint_identity(path)
    student = folder is not None and json.loads((folder / SPEC_FILE).read_text()).get("iem_hidden", 0) > 0

    def load_encoder():
        if dims is not None:
            return encoder_backend(MegatronEncoder(folder or consolidated_folder(path, work_dir), dims))
        return encoder_backend(Encoder.from_pretrained(folder or consolidated_folder(path, work_dir), device=device))

    meta = make_meta(name, revision, instructions=table, similarity=None if student else ScoringFunction.COSINE,
                     loader=mteb_loader, loader_kwargs={"spec": str(path.resolve())})
    return EmbedforgeModel(load_encoder, meta, table, batch_size, group=dims.dp_group if dims else None)


def _model_parallel_dims(spec: str, tp: int, pp: int) -> ParallelDims | None:
    """The rank layout of a model-parallel evaluation (None for one process per model)."""
    if tp * pp == 1:
        return None
    if spec == MINILM:
        raise InputError("--tp / --pp: the MiniLM baseline runs in one process; evaluate it without them")
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    return ParallelDims.model_parallel_groups(tp, pp, world, dist.get_rank() if world > 1 else 0, what="eval")


def mteb_loader(model_name: str, revision: str | None = None, *, spec: str, **kwargs: Any) -> EmbedforgeModel:
    """ModelMeta.loader: `meta.load_model()` (and mteb's own CLI paths) rebuild the model from its spec."""
    return load_model(spec, **{k: v for k, v in kwargs.items() if k in ("instructions", "batch_size", "device")})


# ----------------------------------------------------------------------------- evaluation
class RankZeroCache(ResultCache):
    """Every rank reads the cache (so all skip the same tasks); only rank 0 writes it. A cached result of
    another data revision than the task's (a local task of other sizes) reads as missing: mteb's own
    `only-missing` would return it as this task's score."""

    def __init__(self, cache_path: str | Path, revisions: Mapping[str, str] | None = None):
        super().__init__(cache_path)
        self.revisions = dict(revisions or {})

    def load_task_result(self, task_name: str, *args: Any, **kwargs: Any) -> Any:
        result = super().load_task_result(task_name, *args, **kwargs)
        expected = self.revisions.get(task_name)
        if result is not None and expected and result.dataset_revision != expected:
            log.info("%s: the cached result is of data revision %s, not %s: computed again", task_name,
                     result.dataset_revision, expected)
            return None
        return result

    def save_to_cache(self, *args: Any, **kwargs: Any) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            super().save_to_cache(*args, **kwargs)


def evaluate(model_spec: str | EmbedforgeModel, tasks: Iterable[AbsTask], cache_dir: str | Path,
             overwrite: str = "only-missing", *, instructions: Instructions | str | Path | None = None,
             batch_size: int | None = None, work_dir: Path | None = None, raise_error: bool = True) -> dict[str, float]:
    """{task name: main score} through `mteb.evaluate` with a ResultCache at `cache_dir`; rounded to
    SCORE_DIGITS like the cache stores them, so a fresh score equals the one read back later.
    `model_spec` is a spec for `load_model` or an already built model (then `instructions` is its own)."""
    model = model_spec if isinstance(model_spec, EmbedforgeModel) else load_model(
        model_spec, instructions=instructions, batch_size=batch_size or 32, work_dir=work_dir)
    tasks = list(tasks)
    revisions = {t.metadata.name: (t.metadata.dataset or {}).get("revision") for t in tasks}
    result = mteb.evaluate(model, tasks, cache=RankZeroCache(cache_dir, revisions), overwrite_strategy=overwrite,
                           encode_kwargs={"batch_size": batch_size or model.batch_size, "show_progress_bar": False},
                           co2_tracker=False, raise_error=raise_error, show_progress_bar=False)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 has written the cache before anyone moves on
    return {r.task_name: round(float(r.get_score()), SCORE_DIGITS) for r in result.task_results}


def run_job(job: SweepJob, cache_dir: str | Path, *, instructions: str | None = None, batch_size: int = 32,
            cache_only: bool = False, device: str = "auto", tp: int = 1, pp: int = 1,
            sizes: Mapping[str, Mapping[str, int]] | None = None) -> list[ResultRow]:
    """Evaluate one job through mteb's result cache (only what is missing is computed; a job whose
    results are all cached loads no model) and return its rows, scores x 100. `cache_only`: read
    what is cached and compute nothing (a report after SLURM array tasks, some of which may have failed).
    `device` (auto | cpu | cuda) is resolved where the job runs (a Ray task's or array task's GPU);
    `tp` x `pp` > 1: every rank of this process group runs the job alike (`load_model`). `sizes`: the
    sweep's local task sizes (`select_tasks`), of which the job's own tasks take theirs."""
    own = {k: v for k, v in (sizes or {}).items() if ALIASES.get(k, k) in job.tasks}
    tasks = select_tasks(list(job.tasks), sizes=own)
    metric = {t.metadata.name: t.metadata.main_score for t in tasks}
    where = str(resolve_device(device, field="eval sweep --device"))
    model = load_model(job.model.spec, instructions=instructions, batch_size=batch_size, device=where, tp=tp,
                       pp=pp)  # loads lazily
    if cache_only:
        scores = evaluate(model, tasks, cache_dir, "only-cache", batch_size=batch_size, raise_error=False)
    else:
        scores = evaluate(model, tasks, cache_dir, batch_size=batch_size)
    m = job.model
    log.info("%s on %s: %s", m.label, ", ".join(job.tasks), "evaluated" if model.loaded else "all cached")
    return [ResultRow(m.label, name, round(100 * score, 4), metric[name], m.run, m.stage, m.step)
            for name, score in scores.items()]
