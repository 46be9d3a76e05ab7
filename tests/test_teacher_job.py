"""`embedforge teacher score`: a pair dataset scored into a scored dataset by a tiny teacher, locally,
as torchrun-style ranks (resume after a partial run), and on a local Ray cluster (2 actors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_pipelines.manifest import load_manifest
from data_pipelines.stream import ReadStats, read_shard
from tests.helpers import NO, YES, run_embedforge


def score(teacher_dir, pairs, out, *extra, env=None):
    return run_embedforge("teacher", "score", "--model", str(teacher_dir), "--input", str(pairs), "--output", str(out),
                          "--yes", YES, "--no", NO, "--group-size", "3", "--batch-size", "7", *extra, env=env)


def read_all(folder: Path) -> dict[str, dict]:
    m = load_manifest(folder)
    assert m.kind == "scored"
    out = {}
    for shard in m.shards:
        for s in read_shard(m.shard_url(shard), shard, "scored", ReadStats()):
            out[s["id"]] = s
    return out


def test_scores_resume_and_settings(teacher_dir, pairs, tmp_path):
    out = tmp_path / "scored"
    half = score(teacher_dir, pairs, out, env={"RANK": "0", "WORLD_SIZE": "2"})  # rank 0 of 2: half the shards
    assert half.returncode == 0, half.stderr[-3000:]
    assert "other shards are still being scored" in half.stdout and not (out / "manifest.json").exists()
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert len(first) == 2
    rest = score(teacher_dir, pairs, out)
    assert rest.returncode == 0 and "scored 2 shard(s); dataset complete" in rest.stdout, rest.stderr[-3000:]
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in first.items())  # finished shards kept

    samples = read_all(out)
    assert len(samples) == 16
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.teacher.scoring import Teacher, TeacherPrompt

    teacher = Teacher(AutoModelForCausalLM.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(teacher_dir),
                      TeacherPrompt(yes=YES, no=NO))
    groups: dict[str, list[dict]] = {}
    for s in samples.values():
        groups.setdefault(s["group"], []).append(s)
        assert s["inbatch_scores"][s["group_index"]] == s["scores"][0]  # the diagonal is its own positive
    sizes = sorted(len(g) for g in groups.values())
    assert sizes == [1, 2, 2, 2, 3, 3, 3]  # groups of 3 in file order within each shard (5 = 3 + 2, 1)
    for group in groups.values():
        group.sort(key=lambda s: s["group_index"])
        for s in group:
            want, _ = teacher.score([s["query"]] * (1 + len(s["negatives"])), [s["positive"], *s["negatives"]])
            assert torch.allclose(torch.tensor(s["scores"]), want, atol=1e-5)
            inb, _ = teacher.score([s["query"]] * len(group), [o["positive"] for o in group])
            assert torch.allclose(torch.tensor(s["inbatch_scores"]), inb, atol=1e-5)

    again = score(teacher_dir, pairs, out)  # nothing left to do
    assert again.returncode == 0 and "scored 0 shard(s)" in again.stdout
    other = score(teacher_dir, pairs, out, "--group-size", "4")
    assert other.returncode == 2 and "job.json" in other.stderr and "group_size" in other.stderr
    wrong = score(teacher_dir, out, tmp_path / "x")  # a scored dataset is not a pair dataset
    assert wrong.returncode == 2 and "holds scored samples" in wrong.stderr


def test_bf16_teacher_and_devices(teacher_dir, pairs, tmp_path):
    """bf16 weights score close to fp32 (and are another job: the dtype is fingerprinted); a device
    this machine lacks is refused in one line, before the teacher is read and with nothing written."""
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert score(teacher_dir, pairs, fp32, "--device", "cpu").returncode == 0
    r = score(teacher_dir, pairs, bf16, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_all(fp32), read_all(bf16)
    assert a.keys() == b.keys()
    diff = max(abs(x - y) for k in a for x, y in zip(a[k]["scores"], b[k]["scores"]))
    assert 0 < diff < 0.05, diff
    assert score(teacher_dir, pairs, fp32, "--dtype", "bfloat16").returncode == 2  # not fp32's job
    assert (r := score(teacher_dir, pairs, tmp_path / "x", "--dtype", "float16")).returncode == 2
    assert "--dtype float16: must be one of float32, bfloat16" in r.stderr
    if not torch.cuda.is_available():
        r = score(teacher_dir, pairs, tmp_path / "cuda", "--device", "cuda")
        assert r.returncode == 2 and "teacher --device=cuda: CUDA is not available here" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not any((tmp_path / "cuda").glob("*.tar"))


@pytest.mark.slow
def test_ray_scoring_on_a_local_cluster(teacher_dir, pairs, tmp_path):
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert score(teacher_dir, pairs, local).returncode == 0
    r = score(teacher_dir, pairs, distributed, "--ray", "local", "--workers", "2",
              env={"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["pending"] == 4 and len(summary["scored"]) == 4 and summary["manifest"]
    want, got = read_all(local), read_all(distributed)
    assert want.keys() == got.keys()
    for key in want:
        assert want[key]["scores"] == pytest.approx(got[key]["scores"], abs=1e-6)
        assert want[key]["inbatch_scores"] == pytest.approx(got[key]["inbatch_scores"], abs=1e-6)
