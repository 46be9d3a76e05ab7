"""Small shard sets written directly with webdataset.TarWriter (independent of our writer)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import webdataset as wds

from data_pipelines.manifest import Manifest, ShardInfo
from data_pipelines.records import sample_key


def write_shards(folder: Path, samples: list[dict], per_shard: int, kind: str = "text") -> Manifest:
    """Shards of `per_shard` samples (one task per shard for pair data) plus a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[dict]] = {}
    for s in samples:
        by_task.setdefault(s.get("task", "default") if kind != "text" else "default", []).append(s)
    shards = []
    for task, rows in by_task.items():
        for n, start in enumerate(range(0, len(rows), per_shard)):
            name = f"{task}-{n:06d}.tar"
            with wds.TarWriter(str(folder / name)) as sink:
                for s in rows[start : start + per_shard]:
                    sink.write({"__key__": sample_key(s["id"]), "json": json.dumps(s).encode()})
            data = (folder / name).read_bytes()
            shards.append(ShardInfo(name=name, samples=len(rows[start : start + per_shard]), bytes=len(data),
                                    sha256=hashlib.sha256(data).hexdigest(), task=task))
    manifest = Manifest(kind=kind, shards=shards, source="test")
    manifest.save(folder)
    manifest.root = folder
    return manifest


def text_samples(n: int, prefix: str = "t") -> list[dict]:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [{"id": f"{prefix}{i}", "text": " ".join(words[: 1 + i % len(words)]) + f" number {i}"} for i in range(n)]
