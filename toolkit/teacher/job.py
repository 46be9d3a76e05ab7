"""The teacher scoring job: a `pair` dataset in, a `scored` dataset out, one output shard per input
shard, embarrassingly parallel over shards (local processes, torchrun ranks or Ray workers).

Each input shard is cut, in file order, into planned batches ("groups") of `group_size` queries. For
every sample the teacher scores exactly what D2LLM training reads: its positive, its K hard
negatives, and its query against every other group member's positive (the in-batch pairs), keyed by
sample id and group, so the scores follow the samples through any re-sharding or topology.

Resume: an output shard counts once its sidecar `.scored/<shard>.json` (samples, size, sha256) exists
and the shard file has that size; a rerun scores only the shards without one, and refuses an output scored with other settings
(`job.json`). The manifest is written when every shard is done. Nothing is written in place: a
shard is built under a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.distributed as dist

from data_pipelines.manifest import Manifest, ShardInfo, load_manifest, sha256_file
from data_pipelines.records import sample_key
from data_pipelines.stream import ReadStats, read_shard
from data_pipelines.writer import TAR_MTIME
from toolkit.atomic import atomic_write_text
from toolkit.distributed.device import resolve_device, resolve_megatron_device
from toolkit.distributed.parallel_dims import ParallelDims
from toolkit.engines.megatron.inference import MegatronForward
from toolkit.errors import InputError
from toolkit.models.loading import DTYPES, resolve_model_path
from toolkit.models.teacher_folder import read_teacher_spec
from toolkit.models.yes_no import instructed_query
from toolkit.teacher.megatron_teacher import MegatronTeacher
from toolkit.teacher.scoring import Teacher, TeacherPrompt

log = logging.getLogger(__name__)
DONE_DIR = ".scored"
JOB_FILE = "job.json"


@dataclass(kw_only=True)
class ScoreJob:
    model: str  # HF folder, .gguf file or asset:NAME of the (instruction-tuned) teacher LLM
    input: str  # a `pair` dataset folder (manifest.json)
    output: str  # the `scored` dataset folder to write
    group_size: int = 8  # queries per planned batch whose in-batch pairs are scored
    batch_size: int = 16  # pairs per teacher forward
    features: bool = False  # store the teacher's last hidden state per candidate (feature imitation)
    symmetric_tasks: list[str] = field(default_factory=list)  # tasks scored with the symmetric template
    prompt: TeacherPrompt = field(default_factory=TeacherPrompt)
    dtype: str = "float32"  # the teacher's weights: float32 | bfloat16
    device: str = "auto"  # auto | cpu | cuda (auto: this process's GPU when CUDA is present)
    tp: int = 1  # > 1 or pp > 1: the teacher runs as megatron stages, one worker = tp x pp ranks
    pp: int = 1

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.batch_size < 1:
            raise InputError(f"teacher job: group_size ({self.group_size}) and batch_size ({self.batch_size}) must be >= 1")
        if self.tp < 1 or self.pp < 1:
            raise InputError(f"teacher job: --tp {self.tp} / --pp {self.pp}: must be >= 1")
        if self.dtype not in DTYPES:
            raise InputError(f"teacher job: --dtype {self.dtype}: must be one of {', '.join(DTYPES)}")

    def fingerprint(self) -> dict:
        """What makes two runs' scores interchangeable (batch_size only changes speed)."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("output")
        for where in ("device", "tp", "pp"):  # where it runs: shards scored on a GPU, a CPU, at TP2 belong together
            d.pop(where)
        return d

    @property
    def model_parallel(self) -> bool:
        return self.tp * self.pp > 1

    def dims(self, world: int, rank: int) -> ParallelDims:
        """The world as teachers of tp x pp ranks each; refused unless tp x pp divides `world`."""
        return ParallelDims.model_parallel_groups(self.tp, self.pp, world, rank, what="teacher job")


def teacher_settings(model: str, prompt_file: str | None = None, symmetric_tasks: list[str] | None = None,
                     **overrides) -> tuple[TeacherPrompt, list[str]]:
    """(prompt, symmetric tasks) a job scores with: `prompt_file`, else the prompt a fine-tuned teacher
    folder was trained with, else the built-in, then the `overrides` that are not None (command-line
    flags); `symmetric_tasks` when given, else the folder's, else none."""
    path = resolve_model_path(model)
    trained = read_teacher_spec(path) if path.is_dir() else None
    base = (TeacherPrompt.from_file(prompt_file) if prompt_file else None) or \
        (trained[0] if trained else None) or TeacherPrompt()
    prompt = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    return prompt, symmetric_tasks if symmetric_tasks is not None else trained[1] if trained else []


def pending_shards(job: ScoreJob) -> tuple[Manifest, list[ShardInfo]]:
    """The input manifest and its shards not yet scored into `job.output` (checks the settings match)."""
    manifest = load_manifest(job.input)
    if manifest.kind != "pair":
        raise InputError(f"{job.input}: holds {manifest.kind} samples; teacher scoring reads a pair dataset "
                         "(query, positive, negatives): build one with `embedforge data build --kind pair`")
    out = Path(job.output)
    (out / DONE_DIR).mkdir(parents=True, exist_ok=True)
    job_file = out / JOB_FILE
    want = json.dumps(job.fingerprint(), sort_keys=True, default=str)
    if job_file.is_file():
        have = json.loads(job_file.read_text())
        if json.dumps(have, sort_keys=True, default=str) != want:
            changed = sorted(k for k in set(have) | set(job.fingerprint())
                             if json.dumps(have.get(k), default=str) != json.dumps(job.fingerprint().get(k), default=str))
            raise InputError(f"{job_file}: this output was scored with other settings ({', '.join(changed)}); "
                             "use a new --output, or delete it to rescore")
    else:
        atomic_write_text(job_file, json.dumps(job.fingerprint(), indent=1, sort_keys=True, default=str) + "\n")
    return manifest, [s for s in manifest.shards if _done(out, s) is None]


def _done(out: Path, shard: ShardInfo) -> ShardInfo | None:
    """The output shard's info if it was completed (sidecar present and the file matches it)."""
    sidecar = out / DONE_DIR / f"{shard.name}.json"
    if not sidecar.is_file() or not (out / shard.name).is_file():
        return None
    info = ShardInfo(**json.loads(sidecar.read_text()))
    return info if (out / shard.name).stat().st_size == info.bytes else None


def load_teacher(job: ScoreJob, dims: ParallelDims | None = None):
    """The HF teacher in this process, or with `dims` (job.model_parallel) this rank's megatron stage
    of it (a collective: every rank of the world builds its stage)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(job.model)
    if dims is not None:
        resolve_megatron_device(job.device, field="teacher --device")  # before any weight is read
        forward = MegatronForward(path, dims, dtype=DTYPES[job.dtype], include_head=True, max_length=job.prompt.max_length)
        return MegatronTeacher(forward, AutoTokenizer.from_pretrained(path), job.prompt)
    device = resolve_device(job.device, field="teacher --device")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[job.dtype]).to(device)
    return Teacher(model, AutoTokenizer.from_pretrained(path), job.prompt)


def score_shard(job: ScoreJob, manifest: Manifest, shard: ShardInfo, teacher) -> ShardInfo | None:
    """Score one input shard into `job.output/<shard.name>` (+ its sidecar); returns the output info
    (None on a model-parallel teacher's ranks that do not write)."""
    import webdataset as wds

    out = Path(job.output)
    stats = ReadStats()
    samples = list(read_shard(manifest.shard_url(shard), shard, "pair", stats))
    symmetric = shard.task in job.symmetric_tasks
    groups = range(0, len(samples), job.group_size)
    if not teacher.writes:  # a model-parallel teacher's other ranks: the same forwards, nothing written
        for g in groups:
            _score_group(teacher, samples[g : g + job.group_size], "", symmetric, job)
        return None
    tmp = out / f".{shard.name}.partial-{os.getpid()}"
    with wds.TarWriter(str(tmp), encoder=False, mtime=TAR_MTIME) as sink:
        for g in groups:
            group = samples[g : g + job.group_size]
            for record in _score_group(teacher, group, f"{shard.name}/{g // job.group_size}", symmetric, job):
                sink.write({"__key__": sample_key(record["id"]), "json": json.dumps(record).encode("utf-8")})
    info = ShardInfo(shard.name, len(samples), bytes=tmp.stat().st_size, sha256=sha256_file(tmp), task=shard.task)
    os.replace(tmp, out / shard.name)
    atomic_write_text(out / DONE_DIR / f"{shard.name}.json", json.dumps(asdict(info)) + "\n")
    if stats.num_bad:
        log.warning("%s: %d bad records skipped (%s)", shard.name, stats.num_bad, stats.bad)
    return info


def _score_group(teacher, group: list[dict], group_id: str, symmetric: bool, job: ScoreJob) -> list[dict]:
    """Every pair one group's training step reads, scored in one call, back onto its samples."""
    queries, passages, where = [], [], []
    for i, s in enumerate(group):
        query = instructed_query(s["query"], s.get("instruction"))
        for k, cand in enumerate([s["positive"], *s["negatives"]]):
            queries.append(query)
            passages.append(cand)
            where.append(("cand", i, k))
        for j, other in enumerate(group):
            if j != i:
                queries.append(query)
                passages.append(other["positive"])
                where.append(("inb", i, j))
    scores, feats = teacher.score(queries, passages, symmetric, batch_size=job.batch_size, features=job.features)
    records = []
    for i, s in enumerate(group):
        n = 1 + len(s["negatives"])
        records.append({**{k: v for k, v in s.items() if k != "tokens"}, "scores": [0.0] * n,
                        "group": group_id, "group_index": i, "inbatch_scores": [0.0] * len(group)})
        if job.features:
            records[-1]["features"] = [None] * n
    for (kind, i, k), score, row in zip(where, scores.tolist(), range(len(where))):
        if kind == "cand":
            records[i]["scores"][k] = score
            if k == 0:
                records[i]["inbatch_scores"][i] = score  # the diagonal: its own positive
            if job.features:
                records[i]["features"][k] = [round(x, 5) for x in feats[row].tolist()]
        else:
            records[i]["inbatch_scores"][k] = score
    return records


def finish(job: ScoreJob, manifest: Manifest) -> Path | None:
    """Write the scored dataset's manifest once every input shard is done; None while some are not."""
    out = Path(job.output)
    infos = [_done(out, s) for s in manifest.shards]
    if any(i is None for i in infos):
        return None
    from datetime import datetime, timezone

    scored = Manifest(kind="scored", shards=infos, source=str(job.input),
                      created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      build={"teacher": job.fingerprint()})
    return scored.save(out)


def run_local(job: ScoreJob, rank: int = 0, world: int = 1) -> list[ShardInfo]:
    """Score this rank's share (every world-th pending shard) in this process; a model-parallel job
    (torchrun ranks, process group initialised) shares the shards out per TP x PP worker."""
    manifest, pending = pending_shards(job)
    names = {s.name for s in pending}  # a rank's share is fixed by manifest position, whatever is done already
    if not job.model_parallel:
        mine = [s for i, s in enumerate(manifest.shards) if i % world == rank and s.name in names]
        teacher = load_teacher(job) if mine else None
    else:
        dims = job.dims(world, rank)
        teacher = load_teacher(job, dims)  # every rank: building the stages is collective
        mine = [s for i, s in enumerate(manifest.shards) if i % dims.dp == dims.dp_rank and s.name in names]
        # the worker's ranks must run the same shards (another worker may finish one in between reads)
        agreed = [[s.name for s in mine]]
        if world > 1:
            dist.broadcast_object_list(agreed, src=dims.group_writer_rank, group=dims.group("mp"))
        mine = [s for s in manifest.shards if s.name in agreed[0]]
    done = []
    for shard in mine:
        info = score_shard(job, manifest, shard, teacher)
        if info is not None:
            done.append(info)
            log.info("scored %s (%d samples)", shard.name, info.samples)
    return done

