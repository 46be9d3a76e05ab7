"""Sample kinds and their validation, shared by the shard writer and the streaming reader.

Kinds:
- `text`: {"id", "text"} (MNTP, SimCSE);
- `pair`: {"id", "query", "positive", "negatives": [...], "instruction", "task"} (supervised);
- `scored`: a pair plus "scores": teacher scores for [positive] + negatives, and optionally
  "features" and the planned batch it belongs to: "group", "group_index" and "inbatch_scores"
  (the teacher's score of this query against every group member's positive) (D2LLM distillation).

A bad record raises `BadRecord(kind_of_problem, message)`; callers count it per kind and skip it
within their budget. Sample ids are stable (`id` field, else `<source name>:<line>`) so anything
keyed by sample (teacher outputs, resumption) survives re-sharding.
"""

from __future__ import annotations

import hashlib
import math

from toolkit.errors import EmbedforgeError

BAD_KINDS = ("corrupt_member", "invalid_json", "missing_field", "wrong_type", "empty_text", "non_utf8", "too_long")


class BadRecord(EmbedforgeError, ValueError):
    def __init__(self, kind: str, message: str):
        assert kind in BAD_KINDS, kind
        super().__init__(message)
        self.kind = kind


def sample_key(sample_id: str) -> str:
    """WebDataset key of a sample: dot- and slash-free, stable, derived from its id."""
    return hashlib.sha1(sample_id.encode("utf-8")).hexdigest()[:24]


def _text(value, field: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise BadRecord("wrong_type", f"field {field!r} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise BadRecord("empty_text", f"field {field!r} is empty")
    if max_chars and len(value) > max_chars:
        raise BadRecord("too_long", f"field {field!r} has {len(value)} characters (> max_chars={max_chars})")
    return value


def _require(record: dict, *fields: str) -> None:
    for f in fields:
        if f not in record:
            raise BadRecord("missing_field", f"missing field {f!r}")


def validate(record: dict, kind: str, *, text_field: str = "text", max_chars: int = 0) -> dict:
    """The normalised sample of `kind` from a raw record (keeps its `id`), or BadRecord."""
    if not isinstance(record, dict):
        raise BadRecord("wrong_type", "a record must be a JSON object")
    if kind == "text":
        _require(record, text_field)
        return {"id": str(record["id"]), "text": _text(record[text_field], text_field, max_chars)}
    _require(record, "query", "positive")
    negatives = record.get("negatives", [record["negative"]] if "negative" in record else [])
    if not isinstance(negatives, list):
        raise BadRecord("wrong_type", "field 'negatives' must be a list of strings")
    instruction = record.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise BadRecord("wrong_type", "field 'instruction' must be a string")
    sample = {
        "id": str(record["id"]),
        "query": _text(record["query"], "query", max_chars),
        "positive": _text(record["positive"], "positive", max_chars),
        "negatives": [_text(n, "negatives", max_chars) for n in negatives],
        "instruction": instruction or None,
        "task": str(record.get("task") or "default"),
    }
    if kind == "scored":
        _require(record, "scores")
        scores = record["scores"]
        want = 1 + len(sample["negatives"])
        if not isinstance(scores, list) or len(scores) != want:
            raise BadRecord("wrong_type", f"field 'scores' must list {want} numbers ([positive] + negatives)")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores):
            raise BadRecord("wrong_type", "field 'scores' must hold finite numbers")
        sample["scores"] = [float(x) for x in scores]
        if "features" in record:
            sample["features"] = record["features"]
        if "group" in record:  # the planned batch the teacher scored in-batch pairs for
            group, index, inbatch = record["group"], record.get("group_index"), record.get("inbatch_scores")
            if not isinstance(group, str) or not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise BadRecord("wrong_type", "fields 'group' (string) and 'group_index' (integer >= 0) go together")
            if not isinstance(inbatch, list) or not (0 <= index < len(inbatch)) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in inbatch):
                raise BadRecord("wrong_type", "field 'inbatch_scores' must list a finite score per group member, "
                                              "this sample's own positive at 'group_index'")
            sample.update(group=group, group_index=index, inbatch_scores=[float(x) for x in inbatch])
    return sample


def text_fields(sample: dict) -> dict[str, str]:
    """The texts of a sample by name (`negative_0`, ...), e.g. for pre-tokenisation and lengths."""
    if "text" in sample:
        return {"text": sample["text"]}
    out = {"query": sample["query"], "positive": sample["positive"]}
    out.update({f"negative_{i}": n for i, n in enumerate(sample["negatives"])})
    return out
