"""mteb v2 integration: local offline tasks from real assets, the encoder wrapper (instructions, length
order, DP sharding, IEM similarity), per-checkpoint result cache with only-missing, task selection."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import free_port, save_tiny_decoder
from toolkit.config import ModelConfig, PoolingConfig
from toolkit.eval.mteb_model import (
    Backend,
    EmbedforgeModel,
    Instructions,
    encoder_backend,
    sharded_encode,
)
from toolkit.eval.mteb_run import MINILM_NAME, evaluate, folder_revision, load_model, select_tasks
from toolkit.eval.mteb_tasks import EmbedforgeRTSentiment, EmbedforgeWordNetRetrieval, same_sense_pairs
from toolkit.models.encoder import Encoder

TEXTS = ["the cat sat on the mat", "a dog", "language models predict the next token in a long sentence about dogs",
         "embeddings", "retrieval finds passages that answer a question", "x y", "the quick brown fox jumps"] * 3 + ["ok"]
SAME_SENSE, RETRIEVAL, SENTIMENT = "EmbedforgeWordNetSameSense", "EmbedforgeWordNetRetrieval", "EmbedforgeRTSentiment"


def make_encoder_folder(path: Path, seed: int = 0, iem: int = 0) -> Path:
    from toolkit.models.loading import build_encoder

    save_tiny_decoder(path.with_name(path.name + "-decoder"), seed=seed)
    encoder, _ = build_encoder(ModelConfig(path=str(path.with_name(path.name + "-decoder")), max_length=96),
                               PoolingConfig(mode="mean"), seed=seed)
    if iem:
        torch.manual_seed(seed)
        encoder.add_iem(iem)
    encoder.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return make_encoder_folder(tmp_path_factory.mktemp("mteb") / "tiny-encoder")


# ----------------------------------------------------------------------------- task selection
def test_real_mteb_tasks_resolve_by_name_type_and_benchmark_without_download():
    tasks = select_tasks(["STSBenchmark", "Banking77Classification", "SciFact", "rt-sentiment"])
    assert [t.metadata.name for t in tasks] == ["STSBenchmark", "Banking77Classification", "SciFact", SENTIMENT]
    assert [t.metadata.type for t in tasks] == ["STS", "Classification", "Retrieval", "Classification"]
    assert tasks[0].metadata.main_score == "cosine_spearman" and not any(t.data_loaded for t in tasks)
    sts = select_tasks(benchmark="MTEB(eng, v1)", task_types=["STS"])
    assert "STSBenchmark" in {t.metadata.name for t in sts} and {t.metadata.type for t in sts} == {"STS"}
    assert [t.metadata.name for t in select_tasks()] == [SENTIMENT, RETRIEVAL, SAME_SENSE, "EmbedforgeSpeechContinuation",
                                                         "EmbedforgeDebateParty", "EmbedforgeRTMovieClustering"]
    assert [t.metadata.name for t in select_tasks(task_types=["Retrieval"])] == [RETRIEVAL,
                                                                                 "EmbedforgeSpeechContinuation"]
    assert select_tasks(task_types=["PairClassification"], languages=["eng"], local=False)  # mteb's registry
    with pytest.raises(ValueError, match="unknown task"):
        select_tasks(["NoSuchTask"])


# ----------------------------------------------------------------------------- local tasks
def test_local_tasks_are_real_and_held_out():
    from toolkit.asset_splits import rt_is_heldout, wordnet_is_heldout
    from toolkit.assets import wordnet_synsets
    from toolkit.eval.local_tasks import rt_snippets

    rt = EmbedforgeRTSentiment()
    rt.load_data()
    ds = rt.dataset["default"]
    assert len(ds["train"]) == 1000 and len(ds["test"]) == 500 and sum(ds["test"]["label"]) == 250
    movie = {text: m for text, _, m in rt_snippets()}
    assert all(rt_is_heldout(movie[t]) for t in ds["test"]["text"])
    assert not any(rt_is_heldout(movie[t]) for t in ds["train"]["text"])

    ret = EmbedforgeWordNetRetrieval()
    ret.load_data()
    split = ret.dataset["default"]["test"]
    assert len(split["queries"]) == len(split["corpus"]) == 600 and len(split["relevant_docs"]) == 600
    synsets = {f"q-{s.pos}{s.offset}": s for p in ("noun", "verb") for s in wordnet_synsets(p)}
    assert all(wordnet_is_heldout(synsets[q]) for q in split["queries"]["id"])

    pairs = same_sense_pairs()
    assert len(pairs) == 600 and sum(p[2] for p in pairs) == 300
    training = {e for p in ("noun", "verb") for s in wordnet_synsets(p) if not wordnet_is_heldout(s) for e in s.examples}
    assert not {p[0] for p in pairs} & training and not {p[1] for p in pairs} & training
    assert pairs == same_sense_pairs()  # fixed hash order


# ----------------------------------------------------------------------------- instructions
def _meta(name: str, kind: str, prompt=None):
    return SimpleNamespace(name=name, type=kind, prompt=prompt)


def test_instructions_per_task_passages_none_and_file_override(tmp_path):
    from mteb.types import PromptType

    from toolkit.asset_splits import WN_INSTRUCTION
    from toolkit.eval.local_tasks import RTSentiment

    table = Instructions()
    assert table.resolve(_meta(RETRIEVAL, "Retrieval"), PromptType.query) == WN_INSTRUCTION
    assert table.resolve(_meta(RETRIEVAL, "Retrieval"), PromptType.document) is None
    assert table.resolve(_meta(SENTIMENT, "Classification")) == RTSentiment().instruction_query
    assert table.resolve(_meta("STSBenchmark", "STS")) == "Retrieve semantically similar text"
    assert table.resolve(_meta("Unlisted", "Retrieval", {"query": "own prompt"}), PromptType.query) == "own prompt"
    assert table.resolve(_meta("Unlisted", "Clustering")) == "Identify the topic or theme of the given text"
    assert table.digest is None

    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({SAME_SENSE: "Are these the same sense", "STSBenchmark": ""}))
    over = Instructions(flat)
    assert over.resolve(_meta(SAME_SENSE, "PairClassification")) == "Are these the same sense"
    assert over.resolve(_meta("STSBenchmark", "STS")) is None  # "" switches it off
    assert over.resolve(_meta(RETRIEVAL, "Retrieval"), PromptType.query) == WN_INSTRUCTION  # defaults kept
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"task_types": {"Clustering": "Group it"}}))
    assert Instructions(nested).resolve(_meta("Unlisted", "Clustering")) == "Group it"
    assert over.digest and over.digest != Instructions(nested).digest
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"X": 3}))
    with pytest.raises(ValueError, match="must be a string"):
        Instructions(bad)


# ----------------------------------------------------------------------------- length order
def test_length_sorted_batches_come_back_in_input_order(encoder_dir):
    encoder = Encoder.from_pretrained(encoder_dir)
    real = encoder_backend(encoder)
    seen: list[list[str]] = []

    def spy(texts, instruction, batch_size):
        seen.append(list(texts))
        return real.encode(texts, instruction, batch_size)

    backend = Backend(spy, real.lengths, real.dim)
    texts = TEXTS + ["   "]
    out = sharded_encode(backend, texts, "find the dog", batch_size=4)
    lengths = real.lengths(seen[0], "find the dog")
    assert list(lengths) == sorted(lengths, reverse=True)  # handed over longest first
    one_by_one = np.stack([encoder.encode([t], instruction="find the dog")[0] for t in TEXTS])
    assert np.abs(out[: len(TEXTS)] - one_by_one).max() < 1e-5
    assert not out[-1].any()  # an empty text is a zero row, not an error


# ----------------------------------------------------------------------------- mteb.evaluate + cache
def test_local_tasks_through_mteb_evaluate_with_only_missing_cache(encoder_dir, tmp_path):
    cache = tmp_path / "cache"
    first = load_model(str(encoder_dir))
    scores = evaluate(first, select_tasks([SAME_SENSE]), cache)
    assert first.encode_calls == 2 and 0.3 < scores[SAME_SENSE] <= 1.0

    # an interrupted sweep continues: only the tasks without a result are computed
    second = load_model(str(encoder_dir))
    all_scores = evaluate(second, select_tasks([SENTIMENT, RETRIEVAL, SAME_SENSE]), cache)
    assert set(all_scores) == {SENTIMENT, RETRIEVAL, SAME_SENSE}
    assert all_scores[SAME_SENSE] == scores[SAME_SENSE]
    assert second.texts_encoded == 965 + 500 + 1200  # RT (union of 5 undersamplings + test) + retrieval, no pairs
    meta = second.mteb_model_meta
    folder = cache / "results" / meta.model_name_as_path() / meta.revision
    files = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    assert {f"{t}.json" for t in all_scores} <= set(files)
    from mteb.models.model_meta import ModelMeta

    stored = ModelMeta.model_validate_json_resolved((folder / "model_meta.json").read_text())  # mteb reads it back
    assert stored.loader_kwargs == {"spec": str(encoder_dir.resolve())}

    # a finished sweep computes nothing: the model is not even loaded, no result file is rewritten
    third = load_model(str(encoder_dir))
    assert evaluate(third, select_tasks([SENTIMENT, RETRIEVAL, SAME_SENSE]), cache) == all_scores
    assert third.encode_calls == 0 and not third.loaded
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")} == files


def test_instruction_override_is_its_own_cache_experiment(encoder_dir, tmp_path):
    override = tmp_path / "instructions.json"
    override.write_text(json.dumps({SAME_SENSE: "Decide whether both sentences use a word in one meaning"}))
    plain, custom = load_model(str(encoder_dir)), load_model(str(encoder_dir), instructions=override)
    a = evaluate(plain, select_tasks([SAME_SENSE]), tmp_path / "cache")[SAME_SENSE]
    b = evaluate(custom, select_tasks([SAME_SENSE]), tmp_path / "cache")[SAME_SENSE]
    assert custom.encode_calls == 2 and a != b  # not served from the default instructions' result
    assert custom.mteb_model_meta.experiment_name and plain.mteb_model_meta.experiment_name is None
    assert len(list((tmp_path / "cache" / "results").rglob(f"{SAME_SENSE}.json"))) == 2


def test_folder_revision_is_a_content_hash(encoder_dir, tmp_path):
    import shutil

    copy = shutil.copytree(encoder_dir, tmp_path / "copy")
    other = make_encoder_folder(tmp_path / "other", seed=1)
    assert folder_revision(encoder_dir) == folder_revision(copy) != folder_revision(other)
    assert folder_revision(encoder_dir, sample=1024) != folder_revision(other, sample=1024)  # head/tail sampling
    meta = load_model(str(encoder_dir)).mteb_model_meta
    assert meta.name == "embedforge/tiny-encoder" and meta.revision == folder_revision(encoder_dir)
    rebuilt = meta.load_model()  # the meta's loader rebuilds the same model from its spec
    assert isinstance(rebuilt, EmbedforgeModel) and rebuilt.mteb_model_meta.revision == meta.revision


def test_minilm_spec_uses_mteb_registry_identity_without_loading():
    import mteb

    model = load_model("minilm")
    meta = model.mteb_model_meta
    assert meta.name == MINILM_NAME and meta.revision == mteb.get_model_meta(MINILM_NAME).revision
    assert not model.loaded and meta.use_instructions is False


# ----------------------------------------------------------------------------- D2LLM student
def test_d2llm_student_scores_pairs_with_its_iem(tmp_path):

    folder = make_encoder_folder(tmp_path / "student", iem=16)
    model = load_model(str(folder))
    assert model.mteb_model_meta.similarity_fn_name is None
    iem = model.backend.iem
    y = model.encode_texts(TEXTS[:5])
    assert np.abs(np.linalg.norm(y, axis=1) - 1).max() > 1e-3  # raw embeddings, as the IEM was trained
    model._symmetric = False
    full = np.asarray(model.similarity(y[:3], y))
    with torch.no_grad():
        want = iem(torch.from_numpy(y[:3])[:, None], torch.from_numpy(y)[None], False)[0].numpy()
    assert full.shape == (3, 5) and np.abs(full - want).max() < 1e-5
    model._symmetric = True
    pair = np.asarray(model.similarity_pairwise(y[:3], y[1:4]))
    with torch.no_grad():
        want = iem(torch.from_numpy(y[:3]), torch.from_numpy(y[1:4]), True)[0].numpy()
    assert np.abs(pair - want).max() < 1e-5

    evaluate(model, select_tasks([SAME_SENSE]), tmp_path / "cache")
    result = json.loads(next((tmp_path / "cache").rglob(f"{SAME_SENSE}.json")).read_text())["scores"]["test"][0]
    assert result["similarity_ap"] != result["cosine_ap"]  # pairs scored by the IEM's symmetric branch


# ----------------------------------------------------------------------------- checkpoints
def test_step_checkpoint_is_consolidated_once_and_cached_per_revision(tiny_llama_dir, tmp_path):
    from tests.helpers import write_data
    from toolkit.config import config_from_dict
    from toolkit.train import Trainer

    texts, _ = write_data(tmp_path)
    stage = {"name": "simcse", "objective": {"kind": "simcse"}, "data": {"path": str(texts), "batch_size": 4, "max_length": 48},
             "steps": 4, "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
             "optimizer": {"lr": 1e-2}}
    cfg = config_from_dict({"output_dir": str(tmp_path / "run"), "seed": 3, "model": {"path": str(tiny_llama_dir), "max_length": 128},
                            "pooling": {"mode": "mean"}, "stages": [stage], "checkpoint": {"every_steps": 2, "keep_last": 2},
                            "logging": {"every_steps": 1, "tensorboard": False, "progress": False}})
    Trainer(cfg).run()
    step, final = tmp_path / "run" / "00-simcse" / "step-2", tmp_path / "run" / "00-simcse" / "final"
    work, cache = tmp_path / "work", tmp_path / "cache"
    m_step, m_final = load_model(str(step), work_dir=work), load_model(str(final), work_dir=work)
    assert m_step.mteb_model_meta.name == m_final.mteb_model_meta.name == "run/00-simcse"
    assert re.fullmatch(r"step-2-[0-9a-f]{8}", m_step.mteb_model_meta.revision)
    assert re.fullmatch(r"final-[0-9a-f]{8}", m_final.mteb_model_meta.revision)
    s_step = evaluate(m_step, select_tasks([SAME_SENSE]), cache)[SAME_SENSE]
    s_final = evaluate(m_final, select_tasks([SAME_SENSE]), cache)[SAME_SENSE]
    assert s_step != s_final
    assert sorted(p.parent.name[:6] for p in (cache / "results").rglob(f"{SAME_SENSE}.json")) == ["final-", "step-2"]
    (consolidated,) = [p for p in work.iterdir() if p.is_dir()]
    stamp = (consolidated / "model.safetensors").stat().st_mtime_ns
    again = load_model(str(step), work_dir=work)
    assert evaluate(again, select_tasks([SAME_SENSE]), cache, overwrite="always")[SAME_SENSE] == pytest.approx(s_step, abs=1e-6)
    assert again.loaded and (consolidated / "model.safetensors").stat().st_mtime_ns == stamp  # consolidated once


@pytest.mark.slow
def test_minilm_baseline_through_mteb(tmp_path):
    model = load_model("minilm")
    score = evaluate(model, select_tasks([SAME_SENSE]), tmp_path / "cache")[SAME_SENSE]
    assert score > 0.65 and model.loaded  # a trained encoder separates senses far above chance (0.5)


# ----------------------------------------------------------------------------- data parallel
def _rank_main(rank: int, world: int, port: int, folder: str, out: str, cache: str, tp: int = 1) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = load_model(folder, batch_size=4, tp=tp)
        many = model.encode_texts(TEXTS, instruction="find the dog")
        few = model.encode_texts(["only one text"])  # fewer texts than ranks: one rank encodes nothing
        score = evaluate(model, select_tasks([SAME_SENSE]), cache)[SAME_SENSE]
        np.savez(Path(out) / f"rank{rank}.npz", many=many, few=few, score=score, texts=model.texts_encoded)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world,tp", [(2, 1), (4, 2)], ids=["dp2", "dp2-tp2"])
def test_sharded_encoding_equals_one_rank(encoder_dir, tmp_path, world, tp):
    """Texts sharded over 2 data-parallel ranks, or over 2 groups of 2 ranks that each hold the encoder
    as megatron TP2 stages (`MegatronEncoder`): embeddings and task score as one process."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(world, free_port(), str(encoder_dir), str(tmp_path), str(tmp_path / "dp-cache"), tp),
             nprocs=world, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(world)]
    single = load_model(str(encoder_dir), batch_size=4)
    want_many = single.encode_texts(TEXTS, instruction="find the dog")
    want_few = single.encode_texts(["only one text"])
    want_score = evaluate(single, select_tasks([SAME_SENSE]), tmp_path / "one-cache")[SAME_SENSE]
    for r in ranks:
        assert np.abs(r["many"] - want_many).max() < 1e-5 and np.abs(r["few"] - want_few).max() < 1e-5
        assert float(r["score"]) == pytest.approx(want_score, abs=1e-6)
    assert len(list((tmp_path / "dp-cache").rglob(f"{SAME_SENSE}.json"))) == 1  # rank 0 wrote it, once


# ----------------------------------------------------------------------------- CLI
def test_eval_run_command_prints_table_and_writes_json(encoder_dir, tmp_path, capsys):
    import argparse

    from launchers import eval_run

    parser = argparse.ArgumentParser()
    eval_run.add_parser(parser.add_subparsers(dest="eval_command"))
    args = parser.parse_args(["run", "--models", str(encoder_dir), "--tasks", f"{SAME_SENSE},wordnet-retrieval",
                              "--cache", str(tmp_path / "cache"), "--batch-size", "16"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"| model | revision | {SAME_SENSE} (max_ap) | {RETRIEVAL} (ndcg_at_10) |" in out
    result = json.loads((tmp_path / "cache" / "eval_run.json").read_text())
    assert set(result["models"][0]["scores"]) == {SAME_SENSE, RETRIEVAL} and result["models"][0]["computed"]
    assert args.func(args) == 0 and "all cached" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_megatron_step_checkpoint_swept_at_tp2_equals_one_process(tiny_llama_dir, tmp_path, monkeypatch):
    """A megatron run's step-N/ through `eval sweep --tp 2` under torchrun: the checkpoint is streamed
    into an encoder folder once (a layer at a time, by rank 0), then each rank of the TP2 group reads
    its slices and encodes as a megatron stage; the sweep's table equals the one-process sweep's."""
    import subprocess

    import yaml

    from tests.helpers import EMBEDFORGE, torchrun, write_data

    monkeypatch.setenv("EMBEDFORGE_CACHE", str(tmp_path / "ef-cache"))  # where step-N/ folders are written
    texts, _ = write_data(tmp_path)
    recipe = tmp_path / "megatron.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "seed": 2, "engine": "megatron",
        "model": {"path": str(tiny_llama_dir), "max_length": 160}, "pooling": {"mode": "mean"},
        "stages": [{"name": "simcse", "steps": 3, "lora": {"enabled": False}, "objective": {"kind": "simcse"},
                    "data": {"path": str(texts), "batch_size": 4, "max_length": 48}, "optimizer": {"lr": 1e-2}}],
        "checkpoint": {"every_steps": 2}, "logging": {"every_steps": 1, "tensorboard": False, "progress": False}}))
    r = subprocess.run([EMBEDFORGE, "train", str(recipe)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = ["eval", "sweep", "--checkpoints", f"{tmp_path / 'run'}/*/step-*", "--tasks", SAME_SENSE]
    one = subprocess.run([EMBEDFORGE, *sweep, "--output", str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    tp2 = torchrun(*sweep, "--tp", "2", "--output", str(tmp_path / "tp2"))
    assert tp2.returncode == 0, tp2.stderr[-3000:]
    rows = {name: json.loads((tmp_path / name / "results.json").read_text())["rows"] for name in ("one", "tp2")}
    assert len(rows["one"]) == 1 and rows["one"][0]["step"] == 2
    assert rows["tp2"][0]["score"] == pytest.approx(rows["one"][0]["score"], abs=1e-3)  # x100 scale
    assert {k: v for k, v in rows["tp2"][0].items() if k != "score"} == \
        {k: v for k, v in rows["one"][0].items() if k != "score"}
