"""The shard writer: every input format round-trips, shards roll and stay single-task, tokens match the
tokenizer, sha256 catches corruption, builds are atomic, bad records are counted, and the CLI."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from data_pipelines.manifest import load_manifest
from data_pipelines.records import sample_key, validate
from data_pipelines.writer import BuildError, build_shards, ensure_asset_shards, verify_shards
from launchers.cli import _size, main
from tests.helpers import CORPUS, build_tokenizer


# ----------------------------------------------------------------------------- helpers
def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member extension: bytes}, in tar order."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for member in tf:
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(member).read()
    return out


def read_all(folder: Path) -> tuple[list[dict], list[dict]]:
    """(samples in manifest order, their raw members); checks every key against its sample id."""
    manifest = load_manifest(folder)
    samples, members = [], []
    for shard in manifest.shards:
        group = read_shard(folder / shard.name)
        assert len(group) == shard.samples
        for key, m in group.items():
            sample = json.loads(m["json"].decode("utf-8"))
            assert key == sample_key(sample["id"])
            samples.append(sample)
            members.append(m)
    return samples, members


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pair_rows(n: int, tasks=("t1",)) -> list[dict]:
    return [{"id": f"p{i}", "query": CORPUS[i % 8], "positive": CORPUS[(i + 1) % 8],
             "negatives": [CORPUS[(i + 2) % 8], CORPUS[(i + 3) % 8]], "instruction": "find it" if i % 2 else None,
             "task": tasks[i % len(tasks)]} for i in range(n)]


def expected(rows: list[dict], kind: str) -> list[dict]:
    return [validate(r, kind) for r in rows]


# ----------------------------------------------------------------------------- formats
def test_jsonl_round_trip_with_stable_ids(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"id": "x1", "text": " hello world "}\n\n{"text": "no id here"}\n{"id": 7, "text": "int id"}\n')
    m = build_shards([str(src)], tmp_path / "out", "text")
    assert load_manifest(tmp_path / "out") == m
    assert (m.kind, m.num_samples, m.tasks(), m.bad_records) == ("text", 3, {"default": 3}, {})
    samples, _ = read_all(tmp_path / "out")
    assert samples == [{"id": "x1", "text": "hello world"}, {"id": "a.jsonl:3", "text": "no id here"},
                       {"id": "7", "text": "int id"}]
    # webdataset itself reads the shards back with the same keys
    urls = [str(tmp_path / "out" / s.name) for s in m.shards]
    got = [(g["__key__"], json.loads(g["json"])) for g in wds.WebDataset(urls, shardshuffle=False)]
    assert got == [(sample_key(s["id"]), s) for s in samples]
    assert m.source == str(src) and m.build["shard_bytes"] == 256 * 2**20 and m.created.endswith("+00:00")


def test_csv_tsv_and_parquet_pairs_round_trip(tmp_path):
    rows = pair_rows(6, tasks=("t1", "t2"))
    header = ["id", "query", "positive", "negatives", "instruction", "task"]
    for suffix, delim in ((".csv", ","), (".tsv", "\t")):
        with open(tmp_path / f"p{suffix}", "w", newline="") as fh:
            w = csv.writer(fh, delimiter=delim)
            w.writerow(header)
            for r in rows:
                w.writerow([r["id"], r["query"], r["positive"], json.dumps(r["negatives"]), r["instruction"] or "",
                            r["task"]])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    for name in ("p.csv", "p.tsv", "p.parquet"):
        build_shards([str(tmp_path / name)], tmp_path / f"out-{name}", "pair")
        samples, _ = read_all(tmp_path / f"out-{name}")
        want = expected(rows, "pair")
        assert sorted(samples, key=lambda s: s["id"]) == want, name  # shards group by task


def test_csv_details_default_ids_plain_negative_and_bad_cells(tmp_path):
    src = tmp_path / "q.csv"
    src.write_bytes(b'query,positive,negatives\n'
                    b'q one,"p one\nspans two lines",n1\n'          # line 2-3: a plain cell is one negative
                    b'q two,p two,\n'                                # line 4: empty negatives = none
                    b'q three,p three,"[""a"", ""b""]"\n'            # line 5: JSON list
                    b'q four,\xff\xfe,n\n'                           # line 6: non-UTF-8 cell
                    b'q five,p five,"[broken"\n')                    # line 7: invalid JSON list
    m = build_shards([str(src)], tmp_path / "out", "pair", max_bad_fraction=0.5)
    samples, _ = read_all(tmp_path / "out")
    assert [(s["id"], s["negatives"]) for s in samples] == [("q.csv:2", ["n1"]), ("q.csv:4", []),
                                                            ("q.csv:5", ["a", "b"])]
    assert samples[0]["positive"] == "p one\nspans two lines"
    assert m.bad_records == {"non_utf8": 1, "invalid_json": 1}


def test_parquet_is_read_in_batches_and_nulls_are_absent(tmp_path):
    n = 2500  # more than one record batch (1024) and several row groups
    table = pa.table({"id": [None if i % 100 == 0 else f"r{i}" for i in range(n)],
                      "body": [f"text number {i}" for i in range(n)]})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=700)
    m = build_shards([str(tmp_path / "big.parquet")], tmp_path / "out", "text", text_field="body")
    samples, _ = read_all(tmp_path / "out")
    assert m.num_samples == n and [s["text"] for s in samples] == [f"text number {i}" for i in range(n)]
    assert samples[0]["id"] == "big.parquet:1" and samples[1]["id"] == "r1" and samples[100]["id"] == "big.parquet:101"


def test_text_file_and_inputs_concatenate_in_order(tmp_path):
    txt = tmp_path / "lines.txt"
    txt.write_text("first line\n\n  \nsecond line\r\n")
    jl = write_jsonl(tmp_path / "more.jsonl", [{"text": "third"}])
    m = build_shards([str(txt), str(jl)], tmp_path / "out", "text")
    samples, _ = read_all(tmp_path / "out")
    assert samples == [{"id": "lines.txt:1", "text": "first line"}, {"id": "lines.txt:4", "text": "second line"},
                       {"id": "more.jsonl:1", "text": "third"}]
    assert m.build["inputs"] == [str(txt), str(jl)]
    with pytest.raises(ValueError, match="plain-text files only hold kind=text"):
        build_shards([str(txt)], tmp_path / "pairs", "pair")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_shards([str(tmp_path / "nope.jsonl")], tmp_path / "x", "text")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- shards
def test_shards_roll_by_samples(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": f"sample {i}"} for i in range(25)])
    m = build_shards([str(src)], tmp_path / "out", "text", shard_samples=10)
    assert [(s.name, s.samples, s.task) for s in m.shards] == [
        ("default-000000.tar", 10, "default"), ("default-000001.tar", 10, "default"), ("default-000002.tar", 5, "default")]
    samples, _ = read_all(tmp_path / "out")
    assert [s["text"] for s in samples] == [f"sample {i}" for i in range(25)]


def test_shards_roll_by_bytes(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": f"{i:04d} " + "x" * 1000} for i in range(22)])
    limit = 5000
    m = build_shards([str(src)], tmp_path / "out", "text", shard_bytes=limit)
    assert [s.samples for s in m.shards] == [5, 5, 5, 5, 2]  # ~1 KB samples
    for shard in m.shards:
        sizes = [sum(map(len, g.values())) for g in read_shard(tmp_path / "out" / shard.name).values()]
        assert sum(sizes) - sizes[-1] < limit  # never kept open past the limit
        if shard is not m.shards[-1]:
            assert sum(sizes) >= limit  # closed by the sample that reached it


def test_pair_shards_hold_one_task_each(tmp_path):
    rows = pair_rows(17, tasks=("nli", "qa.v2", "nli", "nli"))
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    m = build_shards([str(src)], tmp_path / "out", "pair", shard_samples=4)
    assert m.tasks() == {"nli": 13, "qa.v2": 4}
    assert [s.name for s in m.shards] == [f"nli-{i:06d}.tar" for i in range(4)] + ["qa_v2-000000.tar"]
    for shard in m.shards:
        tasks = {json.loads(g["json"])["task"] for g in read_shard(tmp_path / "out" / shard.name).values()}
        assert tasks == {shard.task}
    samples, _ = read_all(tmp_path / "out")
    assert sorted(samples, key=lambda s: int(s["id"][1:])) == expected(rows, "pair")


def test_pretokenised_ids_match_the_tokenizer_untruncated(tmp_path):
    tok = build_tokenizer()
    tok.model_max_length = 8  # the stored ids must still be complete
    tok.save_pretrained(tmp_path / "tok")
    rows = pair_rows(3)
    rows[0]["query"] = " ".join(CORPUS[:4])
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    m = build_shards([str(src)], tmp_path / "out", "pair", tokenizer=str(tmp_path / "tok"))
    assert m.tokenizer == str(tmp_path / "tok") and load_manifest(tmp_path / "out").tokenizer == m.tokenizer
    samples, members = read_all(tmp_path / "out")
    assert len(samples) == 3
    for sample, group in zip(samples, members):
        with np.load(io.BytesIO(group["tokens.npz"])) as z:
            assert sorted(z.files) == ["negative_0", "negative_1", "positive", "query"]
            for name, text in [("query", sample["query"]), ("positive", sample["positive"]),
                               ("negative_0", sample["negatives"][0]), ("negative_1", sample["negatives"][1])]:
                assert z[name].dtype == np.int32
                assert z[name].tolist() == tok(text)["input_ids"]
    with np.load(io.BytesIO(members[0]["tokens.npz"])) as z:
        assert len(z["query"]) > 8


# ----------------------------------------------------------------------------- integrity and safety
def test_sha256_in_manifest_and_verify_finds_damage(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": f"sample {i}"} for i in range(12)])
    m = build_shards([str(src)], tmp_path / "out", "text", shard_samples=4)
    for shard in m.shards:
        data = (tmp_path / "out" / shard.name).read_bytes()
        assert shard.bytes == len(data) and shard.sha256 == hashlib.sha256(data).hexdigest()
    assert verify_shards(tmp_path / "out") == []
    flipped = tmp_path / "out" / m.shards[1].name
    data = bytearray(flipped.read_bytes())
    data[700] ^= 0x01
    flipped.write_bytes(bytes(data))
    problems = verify_shards(tmp_path / "out")
    assert len(problems) == 1 and problems[0].startswith(m.shards[1].name) and "sha256" in problems[0]
    (tmp_path / "out" / m.shards[2].name).unlink()
    with open(tmp_path / "out" / m.shards[0].name, "ab") as fh:
        fh.write(b"junk")
    problems = verify_shards(tmp_path / "out")
    assert len(problems) == 3
    assert any(p.startswith(m.shards[2].name) and "missing" in p for p in problems)
    assert any(p.startswith(m.shards[0].name) and "size" in p for p in problems)


def test_same_input_gives_identical_shards(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": f"sample {i}"} for i in range(5)])
    a = build_shards([str(src)], tmp_path / "a", "text")
    b = build_shards([str(src)], tmp_path / "b", "text")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_refuses_to_clobber_then_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(FileExistsError, match="--overwrite") as err:  # before any input is even looked at
        build_shards([str(tmp_path / "missing.jsonl")], out, "text")
    assert str(out) in str(err.value)
    assert (out / "keep.txt").read_text() == "precious"
    m = build_shards([str(src)], out, "text", overwrite=True)
    assert not (out / "keep.txt").exists() and load_manifest(out).num_samples == 2 == m.num_samples
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.jsonl"]  # no temp or old folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    build_shards([str(src)], empty, "text")  # an empty folder is not clobbering anything


def test_failed_build_leaves_no_temp_and_old_output_intact(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "a"}, {"text": "b"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, "{oops", "{oops"])
    out = tmp_path / "out"
    build_shards([str(good)], out, "text")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(BuildError):
        build_shards([str(bad)], out, "text", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "out"]


def test_bad_records_counted_per_kind_within_and_over_budget(tmp_path, caplog):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "good one"}\n'
                    b'{"text": broken\n'                             # 2 invalid_json
                    b'{"text": "caf\xe9 latin-1"}\n'                 # 3 non_utf8
                    b'{"body": "no text field"}\n'                   # 4 missing_field
                    b'{"text": "   "}\n'                             # 5 empty_text
                    b'{"text": "' + b"y" * 50 + b'"}\n'              # 6 too_long
                    b'{"text": 42}\n'                                # 7 wrong_type
                    b'{"text": "good two"}\n')
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": f"fine {i}"} for i in range(12)])
    m = build_shards([str(good), str(bad)], tmp_path / "out", "text", max_chars=20, max_bad_fraction=0.5)
    assert m.bad_records == {"invalid_json": 1, "non_utf8": 1, "missing_field": 1, "empty_text": 1, "too_long": 1,
                             "wrong_type": 1}
    assert load_manifest(tmp_path / "out").bad_records == m.bad_records
    samples, _ = read_all(tmp_path / "out")
    assert m.num_samples == 14 and samples[-1]["id"] == "bad.jsonl:8"  # line numbers survive bad lines
    assert f"{bad}:2" in caplog.text and "invalid_json" in caplog.text
    with pytest.raises(BuildError) as err:
        build_shards([str(good), str(bad)], tmp_path / "out2", "text", max_chars=20, max_bad_fraction=0.2)
    msg = str(err.value)
    assert f"worst file {bad}: 6 of 8 bad" in msg and f"first: {bad}:2: invalid_json" in msg
    assert "6 of 20 records" in msg and "'too_long': 1" in msg and "--max-bad-fraction" in msg
    assert not (tmp_path / "out2").exists()


def test_duplicate_id_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "same", "text": "a"}, {"text": "b"}, {"id": "same", "text": "c"}])
    with pytest.raises(BuildError, match=r"d.jsonl:3: duplicate sample id 'same' \(first at .*d.jsonl:1\)"):
        build_shards([str(src)], tmp_path / "out", "text", max_bad_fraction=1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_ensure_asset_shards_builds_once(tmp_path, monkeypatch):
    import data_pipelines.writer as writer

    calls = []

    def fake_pairs(limit=None):
        calls.append(limit)
        return [{"id": f"wordnet:n:{i}", "query": f"definition {i}", "positive": f"example {i}",
                 "negative": f"other {i}", "instruction": "retrieve", "task": "wordnet-definition-example"}
                for i in range(7)]

    monkeypatch.setenv("EMBEDFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(writer, "wordnet_training_pairs", fake_pairs)
    folder = ensure_asset_shards("wordnet-pairs")
    assert folder == tmp_path / "cache" / "shards" / "wordnet-pairs"
    m = load_manifest(folder)
    assert (m.kind, m.num_samples, m.build["shard_samples"], m.source) == ("pair", 7, 5000, "asset:wordnet-pairs")
    samples, _ = read_all(folder)
    assert samples[0]["id"] == "wordnet:n:0" and samples[0]["negatives"] == ["other 0"]
    assert ensure_asset_shards("wordnet-pairs") == folder and len(calls) == 1  # cached
    (folder / "manifest.json").write_text("{")
    ensure_asset_shards("wordnet-pairs")
    assert len(calls) == 2 and load_manifest(folder).num_samples == 7  # rebuilt
    with pytest.raises(ValueError, match="unknown dataset"):
        ensure_asset_shards("nope")
    with pytest.raises(ValueError, match="kind=text"):
        build_shards(["asset:nlp-corpus"], tmp_path / "x", "pair")


# ----------------------------------------------------------------------------- CLI
def test_size_parsing():
    assert _size("256MB") == 256 * 2**20 and _size("64K") == 65536 and _size("1.5G") == 3 * 2**29
    assert _size("4096") == 4096 and _size("2mib") == 2 * 2**20
    for bad in ("", "12X", "-1M", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            _size(bad)


def test_cli_build_verify_info(tmp_path, capsys):
    src = write_jsonl(tmp_path / "p.jsonl", pair_rows(9, tasks=("a", "b", "a")) + ["not json"])
    out = tmp_path / "shards"
    args = ["data", "build", "--input", str(src), "--output", str(out), "--kind", "pair", "--shard-size", "1K",
            "--shard-samples", "2", "--max-bad-fraction", "0.2"]
    assert main(args) == 0
    summary = capsys.readouterr().out.strip()
    m = load_manifest(out)
    assert summary == (f"built {out}: {len(m.shards)} shards, 9 samples, 2 tasks, 1 bad records skipped "
                       "(invalid_json=1)")
    assert m.build["shard_bytes"] == 1024 and m.tasks() == {"a": 6, "b": 3}

    assert main(["data", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "kind: pair" in info and "samples: 9" in info and f"shards: {len(m.shards)}" in info
    assert "tasks: a=6, b=3" in info

    assert main(["data", "verify", str(out)]) == 0
    capsys.readouterr()
    target = out / m.shards[-1].name
    target.write_bytes(target.read_bytes()[:-1] + b"!")
    assert main(["data", "verify", str(out)]) == 1
    assert m.shards[-1].name in capsys.readouterr().out

    assert main(args) == 2  # exists: one clear line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("embedforge data build: error:") and "--overwrite" in err[0]
    assert main(args + ["--overwrite"]) == 0 and verify_shards(out) == []
    assert main(["data", "info", str(tmp_path / "nothing")]) == 2
    assert "no manifest" in capsys.readouterr().err
