"""Read a stage's samples from JSONL or plain text, validating every record.

Errors name the file, the line and the field. Sample ids are stable (`id` field, else
`<file name>:<line>`), so anything keyed by sample survives re-sharding and resumption.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

from toolkit.atomic import atomic_write_text
from toolkit.config import DataConfig

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A bad data file or record; the message names the file, line and field."""


def _text(value, where: str, field: str) -> str | None:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    value = value.strip()
    return value or None


def _pair(record: dict, where: str, cfg: DataConfig) -> dict | None:
    for field in ("query", "positive"):
        if field not in record:
            raise DataError(f"{where}: missing field {field!r} (pair samples need query, positive[, negatives])")
    query, positive = _text(record["query"], where, "query"), _text(record["positive"], where, "positive")
    negatives = record.get("negatives", [record["negative"]] if "negative" in record else [])
    if not isinstance(negatives, list):
        raise DataError(f"{where}: field 'negatives' must be a list of strings")
    negatives = [_text(n, where, "negatives") for n in negatives]
    if query is None or positive is None or any(n is None for n in negatives):
        return None
    return {
        "query": query,
        "positive": positive,
        "negatives": negatives,
        "instruction": record.get("instruction") or None,
        "task": str(record.get("task", "default")),
    }


ASSET_DATASETS = ("nlp-corpus", "wordnet-pairs")


def asset_dataset(name: str) -> Path:
    """Materialise a packaged real dataset as JSONL in the asset cache (once) and return its path.

    `nlp-corpus`: 100k English sentences (unsupervised MNTP / SimCSE). `wordnet-pairs`: supervised
    (instructed query, positive, hard negative) triples from WordNet's training split only.
    """
    from toolkit.assets import cache_dir

    if name not in ASSET_DATASETS:
        raise DataError(f"asset:{name}: unknown dataset; packaged datasets are {list(ASSET_DATASETS)}")
    path = cache_dir() / "datasets" / f"{name}.jsonl"
    if path.is_file():
        return path
    if name == "nlp-corpus":
        from toolkit.assets import nlp_corpus_sentences

        records = [{"id": f"nlp-corpus:{i}", "text": t} for i, t in enumerate(nlp_corpus_sentences())]
    else:
        from toolkit.eval.local_tasks import wordnet_training_pairs

        records = [dict(r, id=r.get("id", f"wordnet-pairs:{i}")) for i, r in enumerate(wordnet_training_pairs(None))]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def iter_records(path: Path, text_field: str = "text") -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line: a JSON object per line in `.jsonl` files,
    else the line itself as `{text_field: line}`. Errors name the file and line."""
    with path.open(encoding="utf-8", errors="strict") as fh:
        try:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                if path.suffix != ".jsonl":
                    yield line_no, {text_field: line.rstrip("\n")}
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_no}: each line must be a JSON object")
                yield line_no, record
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 near byte {exc.start}") from None


def read_samples(cfg: DataConfig) -> list[dict]:
    """All samples of `cfg.path` (capped at `cfg.max_samples`); empty texts are skipped and counted."""
    path = asset_dataset(cfg.path[len("asset:"):]) if cfg.path.startswith("asset:") else Path(cfg.path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data.path)")
    if path.suffix != ".jsonl" and cfg.kind != "text":
        raise DataError(f"{path}: plain-text files only hold data.kind=text samples; use JSONL")
    samples: list[dict] = []
    skipped = 0
    for line_no, record in iter_records(path, cfg.text_field):
        where = f"{path}:{line_no}"
        sample_id = str(record.get("id", f"{path.name}:{line_no}"))
        if cfg.kind == "text":
            if cfg.text_field not in record:
                raise DataError(f"{where}: missing field {cfg.text_field!r} (data.text_field)")
            text = _text(record[cfg.text_field], where, cfg.text_field)
            sample = {"text": text} if text else None
        else:
            sample = _pair(record, where, cfg)
        if sample is None:
            skipped += 1
            continue
        sample["id"] = sample_id
        samples.append(sample)
        if cfg.max_samples and len(samples) >= cfg.max_samples:
            break
    if skipped:
        log.warning("%s: skipped %d samples with an empty text", path, skipped)
    if not samples:
        raise DataError(f"{path}: no usable samples (data.kind={cfg.kind}, data.text_field={cfg.text_field})")
    return samples
