"""Trainer: stages chain, resume is bit-identical, GradCache equals the plain step, export works."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import CORPUS, run_config
from toolkit.errors import MissingPathError
from toolkit.train import Trainer


def final_weights(outcomes):
    return [load_file(str(o.final_dir / "model.safetensors")) for o in outcomes]


def test_resume_is_bit_identical(tiny_llama_dir, tmp_path):
    full = Trainer(run_config(tmp_path, tiny_llama_dir, "full")).run()
    assert [o.final_dir is not None for o in full] == [True, True, True]

    cfg = run_config(tmp_path, tiny_llama_dir, "sliced")
    trainer = Trainer(cfg)
    trainer.stop_after_steps = 3  # stops mid-MNTP at step 3 (checkpoint), then mid-SimCSE, ...
    runs = 0
    while True:
        outcomes = trainer.run()
        runs += 1
        if all(o.final_dir for o in outcomes) and len(outcomes) == 3:
            break
        assert runs < 10
    assert runs >= 3
    for a, b in zip(final_weights(full), final_weights(outcomes)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_metrics_tensorboard_and_checkpoints(tiny_llama_dir, tmp_path):
    cfg = run_config(tmp_path, tiny_llama_dir)
    Trainer(cfg).run()
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"mntp", "simcse", "supervised"}
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records)
    assert list((out / "tensorboard" / "mntp").glob("events.out.tfevents.*"))
    assert (out / "00-mntp" / "step-2" / "COMPLETE").is_file()
    assert not (out / "00-mntp" / "step-4").exists()  # the end of a stage is its final/ folder
    assert (out / "02-supervised" / "final" / "embedforge.json").is_file()


def test_gradcache_step_equals_plain_step(tiny_llama_dir, tmp_path):
    only_sup = dict(mntp__steps=1, simcse__steps=1)
    plain = Trainer(run_config(tmp_path, tiny_llama_dir, "plain", **only_sup)).run()
    # GradCache + non-reentrant activation checkpointing vs the plain full-batch step
    cached = Trainer(run_config(tmp_path, tiny_llama_dir, "cached", {"gradient_checkpointing": True}, **only_sup,
                                supervised__objective={"kind": "supervised", "temperature": 0.02,
                                                       "gradcache_chunk_size": 1})).run()
    a, b = final_weights(plain)[-1], final_weights(cached)[-1]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_resume_with_changed_config_is_refused(tiny_llama_dir, tmp_path):
    trainer = Trainer(run_config(tmp_path, tiny_llama_dir))
    trainer.stop_after_steps = 2
    trainer.run()
    changed = run_config(tmp_path, tiny_llama_dir, mntp__optimizer={"lr": 5e-4})
    with pytest.raises(ValueError, match="stages.mntp.optimizer.lr: 0.001 -> 0.0005"):
        Trainer(changed).run()


def test_export_of_a_step_checkpoint(tiny_llama_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    from toolkit.engines.export import consolidate
    from toolkit.models.encoder import Encoder

    trainer = Trainer(run_config(tmp_path, tiny_llama_dir))
    trainer.stop_after_steps = 2
    trainer.run()
    out = consolidate(tmp_path / "run" / "00-mntp" / "step-2", tmp_path / "exported")
    enc = Encoder.from_pretrained(out)
    texts = CORPUS[:3]
    ours = enc.encode(texts)
    theirs = SentenceTransformer(str(out), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(ours - theirs).max() <= 1e-4
    with pytest.raises(MissingPathError, match="no finished stage"):
        consolidate(tmp_path / "run", tmp_path / "x")


def test_bf16_autocast_stage_trains(tiny_llama_dir, tmp_path):
    cfg = run_config(tmp_path, tiny_llama_dir, mntp__precision="bf16", mntp__steps=2, simcse__steps=1, supervised__steps=1)
    outcomes = Trainer(cfg).run()
    assert all(np.isfinite(o.last_loss) for o in outcomes)
