"""Issue 20, items 1, 2 and 6: an encoder folder serves at its own length (export.max_seq_length, auto:
the model's context at most 512), never at the training crop; `embedforge encode` says when it
truncates; lengths above the model's context are refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from launchers.cli import EXIT_USAGE, main
from tests.helpers import CORPUS, save_tiny_decoder, write_data
from toolkit.config import ConfigError, load_config
from toolkit.errors import InputError
from toolkit.models.folder import SERVING_MAX_LENGTH, SPEC_FILE, serving_length

CROP = 16  # model.max_length and data.max_length of the tiny run: the training crop
CONTEXT = 1024  # the tiny model's max_position_embeddings: auto is capped at 512 below it
LONG = " ".join(CORPUS[:4])  # far longer than CROP tokens, within 512 (the tiny tokenizer: ~1 token per 1-3 chars)


def tiny_recipe(tmp_path: Path, model: Path, **top) -> Path:
    texts, _ = write_data(tmp_path)
    file = tmp_path / "recipe.yaml"
    file.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "seed": 3, "model": {"path": str(model), "max_length": CROP},
        "stages": [{"name": "simcse", "objective": {"kind": "simcse"}, "steps": 2,
                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                    "data": {"path": str(texts), "batch_size": 4, "max_length": CROP}}],
        "checkpoint": {"every_steps": 1, "keep_last": 2},
        "logging": {"tensorboard": False, "progress": False}, **top}))
    return file


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory) -> Path:
    return save_tiny_decoder(tmp_path_factory.mktemp("long-context") / "model", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, long_context_model) -> Path:
    tmp = tmp_path_factory.mktemp("serving")
    assert main(["train", str(tiny_recipe(tmp, long_context_model))]) == 0
    return tmp / "run"


def test_serving_length_auto_is_the_context_capped_at_512():
    def cfg(n: int, model_length: int = 64) -> SimpleNamespace:
        return SimpleNamespace(export=SimpleNamespace(max_seq_length=n), model=SimpleNamespace(max_length=model_length))

    assert serving_length(cfg(0), SimpleNamespace(max_position_embeddings=8192)) == SERVING_MAX_LENGTH == 512
    assert serving_length(cfg(0), SimpleNamespace(max_position_embeddings=256)) == 256
    assert serving_length(cfg(0), SimpleNamespace()) == 512  # a config without a context
    assert serving_length(cfg(300), SimpleNamespace(max_position_embeddings=8192)) == 300
    # a run whose own encoder reads 2048 tokens is not served shorter (within the context)
    assert serving_length(cfg(0, 2048), SimpleNamespace(max_position_embeddings=8192)) == 2048
    assert serving_length(cfg(0, 2048), SimpleNamespace(max_position_embeddings=1024)) == 1024
    with pytest.raises(ConfigError, match=r"export.max_seq_length: 300 is longer than the model's context \(256"):
        serving_length(cfg(300), SimpleNamespace(max_position_embeddings=256))


def test_export_max_seq_length_is_checked_naming_the_field(tmp_path, long_context_model):
    file = tiny_recipe(tmp_path, long_context_model)
    assert load_config(file).export.max_seq_length == 0  # auto by default
    with pytest.raises(ConfigError, match=r"export.max_seq_length: must be >= 1 \(or 0: auto"):
        load_config(file, ["export.max_seq_length=-1"])


def test_trained_folder_serves_at_the_export_length_not_the_crop(trained_run):
    from sentence_transformers import SentenceTransformer

    from toolkit.models.encoder import Encoder

    final = trained_run / "00-simcse" / "final"
    assert json.loads((final / SPEC_FILE).read_text())["max_length"] == 512
    assert json.loads((final / "sentence_bert_config.json").read_text())["max_seq_length"] == 512
    st = SentenceTransformer(str(final), device="cpu")
    assert st.max_seq_length == 512  # min(context 1024, 512), not the crop of 16

    ours = Encoder.from_pretrained(final)
    n_tokens = len(ours.tokenizer(LONG)["input_ids"])
    assert CROP < n_tokens <= 512
    assert st.tokenize([LONG])["input_ids"].shape[1] == n_tokens  # encoded whole, not cut at the crop
    cropped = ours.tokenizer.decode(ours.tokenizer(LONG)["input_ids"][1:CROP], skip_special_tokens=True)
    long_emb, cropped_emb = st.encode([LONG, cropped], normalize_embeddings=True)
    assert np.abs(long_emb - cropped_emb).max() > 1e-3  # the tokens past the crop count
    assert np.abs(ours.encode([LONG])[0] - long_emb).max() <= 1e-4  # one folder, one length, same embedding


def test_recipe_export_length_and_export_override(tmp_path, capsys, long_context_model):
    run = tmp_path / "run"
    assert main(["train", str(tiny_recipe(tmp_path, long_context_model)), "export.max_seq_length=100"]) == 0
    assert json.loads((run / "00-simcse" / "final" / SPEC_FILE).read_text())["max_length"] == 100
    capsys.readouterr()

    step = run / "00-simcse" / "step-1"  # a step checkpoint exports at the run's length, or at the flag's
    assert main(["export", "--checkpoint", str(step), "--output", str(tmp_path / "a")]) == 0
    assert "encodes at 100 tokens" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(step), "--output", str(tmp_path / "b"), "--max-seq-length", "200"]) == 0
    assert json.loads((tmp_path / "b" / "sentence_bert_config.json").read_text())["max_seq_length"] == 200
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "c"), "--max-seq-length", "300"]) == 0
    assert json.loads((tmp_path / "c" / SPEC_FILE).read_text())["max_length"] == 300
    capsys.readouterr()

    for source in (run, step):  # a finished run, and a step-N/ (whose run records export.max_seq_length)
        code = main(["export", "--checkpoint", str(source), "--output", str(tmp_path / "d"), "--max-seq-length", "2000"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == EXIT_USAGE and len(err) == 1 and f"--max-seq-length 2000: must be in 1..{CONTEXT}" in err[0], err
        assert not (tmp_path / "d").exists()


def test_export_length_above_the_context_is_refused_at_preflight(tmp_path, capsys, long_context_model):
    file = tiny_recipe(tmp_path, long_context_model)
    assert main(["train", str(file), f"export.max_seq_length={CONTEXT + 1}"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"export.max_seq_length: {CONTEXT + 1} is longer than the model's context ({CONTEXT} " \
        "tokens" in err[0], err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- encode
@pytest.fixture(scope="module")
def folder_512(tmp_path_factory, long_context_model) -> Path:
    from toolkit.config import ModelConfig, PoolingConfig
    from toolkit.models.loading import build_encoder

    encoder, _ = build_encoder(ModelConfig(path=str(long_context_model), max_length=CROP), PoolingConfig())
    return encoder.save_pretrained(tmp_path_factory.mktemp("enc") / "encoder", max_length=512)


def test_encode_uses_the_folders_length_and_warns_when_it_truncates(tmp_path, capsys, folder_512):
    from toolkit.models.encoder import Encoder

    texts = tmp_path / "texts.txt"
    texts.write_text(f"{LONG}\n{LONG} again\nshort\n")
    out = tmp_path / "e.npy"
    assert main(["encode", "--model", str(folder_512), "--input", str(texts), "--output", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err  # nothing is longer than the folder's 512
    encoder = Encoder.from_pretrained(folder_512)
    lines = texts.read_text().splitlines()
    assert np.abs(np.load(out) - encoder.encode(lines)).max() <= 1e-5

    assert main(["encode", "--model", str(folder_512), "--input", str(texts), "--output", str(out),
                 "--max-length", str(CROP)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert err == [f"embedforge encode: warning: 2 of 3 texts are longer than {CROP} tokens and were truncated to "
                   f"{CROP} (--max-length; the model's context is {CONTEXT})"]
    assert np.abs(np.load(out) - encoder.encode(lines, max_length=CROP)).max() <= 1e-5
    assert np.abs(np.load(out)[0] - encoder.encode(lines)[0]).max() > 1e-3  # cut: another embedding


@pytest.mark.parametrize("length, message", [("0", "--max-length 0: must be >= 1"),
                                             (str(CONTEXT + 1), f"--max-length {CONTEXT + 1}: longer than the "
                                                                f"model's context ({CONTEXT} tokens")])
def test_encode_max_length_out_of_range_is_one_line(tmp_path, capsys, folder_512, length, message):
    texts = tmp_path / "texts.txt"
    texts.write_text("short\n")
    code = main(["encode", "--model", str(folder_512), "--input", str(texts), "--output", str(tmp_path / "o.npy"),
                 "--max-length", length])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
    assert code == EXIT_USAGE and len(err) == 1 and message in err[0], err


def test_encoder_max_length_zero_is_an_error_not_a_fallback(folder_512):
    from toolkit.models.encoder import Encoder

    encoder = Encoder.from_pretrained(folder_512)
    with pytest.raises(InputError, match="max_length=0: must be >= 1"):
        encoder.tokenize(["a text"], max_length=0)
    assert encoder.tokenize([LONG])["input_ids"].shape[1] == len(encoder.tokenizer(LONG)["input_ids"])


def test_export_length_is_not_a_resume_setting(tmp_path, long_context_model):
    from toolkit.run_settings import fingerprint_settings, settings_changes

    file = tiny_recipe(tmp_path, long_context_model)
    old, new = (fingerprint_settings(load_config(file, o)) for o in ([], ["export.max_seq_length=100"]))
    assert not any(k.startswith("export") for k in new) and settings_changes(old, new) == []
