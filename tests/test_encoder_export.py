"""Encoder API and sentence-transformers export: same embeddings, every pooling mode."""

import numpy as np
import pytest
import torch

from toolkit.config import ModelConfig, PoolingConfig
from toolkit.models.encoder import Encoder
from toolkit.models.loading import build_encoder

TEXTS = [
    "the cat sat on the mat",
    "a dog runs",
    "language models predict the next token in a sentence about retrieval",
    "embeddings",
]
INSTRUCTION = "find the dog"


def make_encoder(model_dir, mode="mean", **kw):
    encoder, _ = build_encoder(ModelConfig(path=str(model_dir), max_length=48), PoolingConfig(mode=mode, heads=2, num_latents=8, **kw))
    return encoder.eval()


@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "last", "bos", "latent_attention", "pma"])
def test_export_loads_in_sentence_transformers_with_same_embeddings(tiny_llama_dir, tmp_path, mode):
    from sentence_transformers import SentenceTransformer

    encoder = make_encoder(tiny_llama_dir, mode)
    ours = encoder.encode(TEXTS, instruction=INSTRUCTION, batch_size=3)
    out = encoder.save_pretrained(tmp_path / "export")
    from toolkit.models.export import needs_trust_remote_code

    st = SentenceTransformer(str(out), device="cpu", trust_remote_code=needs_trust_remote_code(mode))
    theirs = st.encode(TEXTS, prompt=encoder.format_instruction(INSTRUCTION), normalize_embeddings=True, batch_size=3)
    assert np.abs(ours - theirs).max() <= 1e-4
    reloaded = Encoder.from_pretrained(out).encode(TEXTS, instruction=INSTRUCTION)
    assert np.abs(ours - reloaded).max() <= 1e-5
    # the exported backbone is bidirectional on its own (plain AutoModel, no Embedforge code)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state[0, 0]
        ids[0, -1] = 9
        b = model(input_ids=ids).last_hidden_state[0, 0]
    assert not torch.allclose(a, b)


def test_instruction_is_attended_but_not_pooled(tiny_llama_dir):
    encoder = make_encoder(tiny_llama_dir)
    batch = encoder.tokenize(TEXTS[:2], instruction=INSTRUCTION)
    n = encoder.prompt_length(encoder.format_instruction(INSTRUCTION))
    assert n > 0
    assert batch["embed_mask"][:, :n].sum() == 0
    assert torch.equal(batch["embed_mask"][:, n:], batch["attention_mask"][:, n:])
    plain = encoder.encode(TEXTS[:2])
    instructed = encoder.encode(TEXTS[:2], instruction=INSTRUCTION)
    assert np.abs(plain - instructed).max() > 1e-3  # attended: the instruction changes the states


def test_encode_keeps_input_order_and_matches_single_text(tiny_llama_dir):
    encoder = make_encoder(tiny_llama_dir)
    batched = encoder.encode(TEXTS, batch_size=2)
    singles = np.stack([encoder.encode([t])[0] for t in TEXTS])
    assert np.abs(batched - singles).max() <= 1e-5
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_matryoshka_truncation(tiny_llama_dir):
    encoder = make_encoder(tiny_llama_dir)
    full = encoder.encode(TEXTS, normalize=False)
    short = encoder.encode(TEXTS, dim=16)
    ref = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    assert short.shape == (4, 16) and np.abs(short - ref).max() <= 1e-5
    with pytest.raises(ValueError, match="dim=999"):
        encoder.encode(TEXTS, dim=999)


def test_bad_inputs_are_clear_errors(tiny_llama_dir, tmp_path):
    encoder = make_encoder(tiny_llama_dir)
    with pytest.raises(ValueError, match="text #1 is empty"):
        encoder.encode(["fine", "   "])
    with pytest.raises(TypeError, match="list of texts"):
        encoder.encode("just one string")
    with pytest.raises(FileNotFoundError, match="embedforge.json"):
        Encoder.from_pretrained(tmp_path)
    long_text = " ".join(["word"] * 500)
    assert encoder.tokenize([long_text])["input_ids"].shape[1] == 48  # truncated to max_length
