"""Streaming reader: shard splitting by DP rank and worker, determinism, exact resume, bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from data_pipelines.loader import StreamingLoader
from data_pipelines.manifest import load_manifest
from data_pipelines.stream import DataError
from tests.helpers import text_samples, write_shards
from toolkit.config import DataConfig


def data_cfg(path, **kw) -> DataConfig:
    kw.setdefault("batch_size", 4)
    kw.setdefault("shuffle_buffer", 8)
    kw.setdefault("bucket_batches", 2)
    return DataConfig(path=str(path), **kw)


def take_ids(loader: StreamingLoader, n: int) -> list[list[str]]:
    out = []
    for batch in loader:
        out.append([s["id"] for s in batch])
        if len(out) == n:
            break
    return out


@pytest.fixture
def corpus(tmp_path):
    return write_shards(tmp_path / "corpus", text_samples(96), per_shard=12)  # 8 shards


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_resume_continues_with_the_same_samples(corpus, workers, mode):
    cfg = data_cfg(corpus.root, num_workers=workers, mode=mode)
    full = take_ids(StreamingLoader(corpus, cfg, seed=3), 14)
    first = StreamingLoader(corpus, cfg, seed=3)
    head = take_ids(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # it goes through a JSON checkpoint
    second = StreamingLoader(corpus, cfg, seed=3)
    second.load_state_dict(state)
    assert head + take_ids(second, 7) == full
    assert StreamingLoader(corpus, cfg, seed=4) and take_ids(StreamingLoader(corpus, cfg, seed=4), 14) != full


def test_exact_epoch_visits_every_sample_once_across_ranks_and_workers(corpus):
    cfg = data_cfg(corpus.root, num_workers=2, bucket_batches=1)
    seen = []
    for rank in range(2):  # 4 slots x 2 shards of 12 = 6 batches a slot, 12 a rank
        seen += [i for b in take_ids(StreamingLoader(corpus, cfg, seed=0, dp_rank=rank, dp_world=2), 12) for i in b]
    assert sorted(seen) == sorted(s["id"] for s in text_samples(96))


def test_exact_mode_needs_a_shard_per_reader(tmp_path):
    m = write_shards(tmp_path / "c", text_samples(24), per_shard=12)  # 2 shards
    with pytest.raises(DataError, match="2 shards for 4 readers"):
        StreamingLoader(m, data_cfg(m.root, num_workers=2), seed=0, dp_rank=0, dp_world=2)
    StreamingLoader(m, data_cfg(m.root, num_workers=2, mode="resampled"), seed=0, dp_rank=0, dp_world=2)


def test_resume_with_another_dp_size(corpus):
    cfg = data_cfg(corpus.root, num_workers=0)
    loader = StreamingLoader(corpus, cfg, seed=0, dp_rank=0, dp_world=2)
    take_ids(loader, 3)
    state = loader.state_dict()
    with pytest.raises(DataError, match="exact-epoch order cannot be split differently"):
        StreamingLoader(corpus, cfg, seed=0).load_state_dict(state)
    resampled = data_cfg(corpus.root, num_workers=0, mode="resampled")
    loader = StreamingLoader(corpus, resampled, seed=0, dp_rank=0, dp_world=2)
    take_ids(loader, 3)
    moved = StreamingLoader(corpus, resampled, seed=0, dp_world=1)
    moved.load_state_dict(loader.state_dict())
    assert moved.consumed == 3 and len(take_ids(moved, 4)) == 4


def test_homogeneous_tasks_are_the_same_on_every_rank(tmp_path):
    pairs = [{"id": f"{t}{i}", "query": f"q {t} {i}", "positive": f"p {t} {i}", "negatives": [], "task": t}
             for t in ("nli", "qa", "wiki") for i in range(40)]
    m = write_shards(tmp_path / "pairs", pairs, per_shard=10, kind="pair")
    cfg = data_cfg(m.root, num_workers=2)
    tasks = []
    for rank in range(2):
        batches = take_ids(StreamingLoader(m, cfg, seed=1, dp_rank=rank, dp_world=2), 12)
        assert all(len({i.rstrip("0123456789") for i in b}) == 1 for b in batches)  # one task per batch
        tasks.append([b[0].rstrip("0123456789") for b in batches])
    assert tasks[0] == tasks[1] and len(set(tasks[0])) == 3


# ----------------------------------------------------------------------------- bad input
def _rewrite_member(shard: Path, index: int, payload: bytes) -> None:
    """Replace the index-th .json member of a tar with `payload` (rewriting the tar)."""
    members = []
    with tarfile.open(shard) as tf:
        for m in tf.getmembers():
            members.append((m, tf.extractfile(m).read()))
    with tarfile.open(shard, "w") as tf:
        jsons = 0
        for m, data in members:
            if m.name.endswith(".json"):
                if jsons == index:
                    data = payload
                jsons += 1
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


@pytest.mark.parametrize("payload,kind", [
    (b"{not json", "invalid_json"),
    (b'{"id": "x", "text": "\\u00e9"}'.replace(b"\\u00e9", b"\xff\xfe"), "non_utf8"),
    (b'{"id": "x"}', "missing_field"),
    (b'{"id": "x", "text": "   "}', "empty_text"),
    (json.dumps({"id": "x", "text": "word " * 100}).encode(), "too_long"),
])
def test_bad_records_are_counted_and_skipped_within_budget(tmp_path, payload, kind):
    m = write_shards(tmp_path / "c", text_samples(16), per_shard=8)
    _rewrite_member(m.root / m.shards[0].name, 3, payload)
    cfg = data_cfg(m.root, verify=False, max_chars=200, max_bad_fraction=0.2, shuffle=False, bucket_batches=1)
    loader = StreamingLoader(load_manifest(m.root), cfg, seed=0)
    ids = [i for b in take_ids(loader, 3) for i in b]
    assert "t3" not in ids and len(ids) == 12
    assert loader.stats().bad == {kind: 1}
    strict = StreamingLoader(load_manifest(m.root), data_cfg(m.root, verify=False, max_chars=200, max_bad_fraction=0.0), seed=0)
    with pytest.raises(DataError, match=r"1 of \d+ samples were bad.*max_bad_fraction"):
        take_ids(strict, 3)


def test_truncated_shard_and_unreadable_shard(tmp_path):
    m = write_shards(tmp_path / "c", text_samples(32), per_shard=8)
    first = m.root / m.shards[0].name
    with tarfile.open(first) as tf:
        fourth = tf.getmembers()[3]
    original = first.read_bytes()
    first.write_bytes(original[: fourth.offset_data + 2])  # 3 whole samples, then a cut inside a member
    cfg = data_cfg(m.root, verify=False, max_bad_fraction=0.5, shuffle=False, bucket_batches=1)
    loader = StreamingLoader(load_manifest(m.root), cfg, seed=0)
    take_ids(loader, 4)
    assert loader.stats().bad.get("corrupt_member") == 1 and loader.stats().good == 16
    first.write_bytes(original[: fourth.offset])  # a cut at a header: tarfile sees a clean end
    loader = StreamingLoader(load_manifest(m.root), cfg, seed=0)
    take_ids(loader, 4)
    assert loader.stats().bad.get("corrupt_member") == 1  # caught by the manifest's sample count
    (m.root / m.shards[1].name).write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DataError, match=f"shard {m.shards[1].name}.*unreadable"):
        take_ids(StreamingLoader(load_manifest(m.root), cfg, seed=0), 8)


def test_sha256_mismatch_names_the_shard(tmp_path):
    m = write_shards(tmp_path / "c", text_samples(16), per_shard=8)
    shard = m.root / m.shards[0].name
    data = bytearray(shard.read_bytes())
    i = data.index(b"alpha")
    data[i : i + 5] = b"ALPHA"  # same size, still valid: only the hash can tell
    shard.write_bytes(bytes(data))
    loader = StreamingLoader(load_manifest(m.root), data_cfg(m.root, shuffle=False), seed=0)
    with pytest.raises(DataError, match=f"shard {m.shards[0].name}.*sha256"):
        take_ids(loader, 4)


def test_pipe_and_file_urls(corpus):
    cfg = data_cfg(corpus.root, mode="resampled")
    local = take_ids(StreamingLoader(corpus, cfg, seed=0), 3)
    for template in (f"file://{corpus.root}/{{name}}", f"pipe:cat {corpus.root}/{{name}}"):
        via = DataConfig(**{**cfg.__dict__, "shard_url_template": template})
        assert take_ids(StreamingLoader(corpus, via, seed=0), 3) == local
