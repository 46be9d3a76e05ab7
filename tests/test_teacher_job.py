"""`embedforge teacher score`: a pair dataset scored into a scored dataset by a tiny teacher, locally,
as torchrun-style ranks (resume after a partial run), and on a local Ray cluster (2 actors)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipelines.manifest import load_manifest
from data_pipelines.stream import ReadStats, read_shard
from tests.helpers import EMBEDFORGE, NO, YES, run_embedforge, subprocess_env


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
    # actors asking for GPUs a CPU-only cluster does not have: refused in one line, not pending forever
    r = score(teacher_dir, pairs, tmp_path / "gpu", "--ray", "local", "--gpus-per-worker", "1",
              env={"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    assert r.returncode != 0 and "each Ray worker asks for 1 GPU(s) but the cluster has 0" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_model_parallel_teacher_under_torchrun_equals_the_single_process_scores(teacher_dir, pairs, tmp_path):
    """4 torchrun ranks as 2 workers of TP2 (megatron stages): every shard scored once, by one writer
    per worker, with the single-process HF teacher's scores and features (1e-5)."""
    single, parallel = tmp_path / "single", tmp_path / "tp2"
    a = score(teacher_dir, pairs, single, "--features")
    assert a.returncode == 0, a.stderr[-3000:]
    # "--": torchrun's own parser would take the teacher's --no for an abbreviation of --node-rank
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "--", EMBEDFORGE,
           "teacher", "score", "--model", str(teacher_dir), "--input", str(pairs), "--output", str(parallel),
           "--yes", YES, "--no", NO, "--group-size", "3", "--batch-size", "7", "--features", "--tp", "2"]
    b = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert b.returncode == 0, b.stderr[-3000:]
    assert b.stdout.count("scored 2 shard(s)") == 2 and b.stdout.count("scored 0 shard(s)") == 2, b.stdout
    want, got = read_all(single), read_all(parallel)
    assert want.keys() == got.keys() and len(want) == 16
    for key, w in want.items():
        g = got[key]
        assert g["group"] == w["group"] and g["group_index"] == w["group_index"]
        for field in ("scores", "inbatch_scores"):
            assert max(abs(x - y) for x, y in zip(g[field], w[field])) <= 1e-5, (key, field)
        assert max(abs(x - y) for fx, fy in zip(g["features"], w["features"]) for x, y in zip(fx, fy)) <= 2e-5
    assert json.loads((parallel / "job.json").read_text()) == json.loads((single / "job.json").read_text())


def test_model_parallel_teacher_is_refused_on_ray_and_on_ranks_it_does_not_divide(teacher_dir, pairs, tmp_path):
    r = score(teacher_dir, pairs, tmp_path / "ray", "--tp", "2", "--ray", "local")
    assert r.returncode != 0 and "--ray with --tp / --pp" in r.stderr and "Traceback" not in r.stderr
    r = score(teacher_dir, pairs, tmp_path / "odd", "--tp", "2", env={"RANK": "0", "WORLD_SIZE": "3"})
    assert r.returncode != 0 and "--tp 2 x --pp 1 does not divide the 3 ranks" in r.stderr, r.stderr[-2000:]
