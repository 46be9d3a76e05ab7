"""Real SmolLM2-135M weights (packaged GGUF): bidirectional, trains through MNTP + SimCSE, exports."""

import numpy as np
import pytest

from toolkit.config import config_from_dict

pytestmark = pytest.mark.slow


def test_smollm2_mntp_simcse_export(tmp_path):
    from sentence_transformers import SentenceTransformer

    from toolkit.models.bidirectional import check_bidirectional
    from toolkit.models.encoder import Encoder
    from toolkit.train import Trainer

    stage = {"data": {"path": "asset:nlp-corpus", "batch_size": 4, "max_length": 24},
             "steps": 2, "lora": {"r": 4, "alpha": 8}}
    cfg = config_from_dict({
        "output_dir": str(tmp_path / "run"),
        "model": {"path": "asset:smollm2-135m-instruct", "max_length": 64},
        "stages": [
            {"name": "mntp", "objective": {"kind": "mntp", "mntp": {"mask_token": "underscore"}}, **stage},
            {"name": "simcse", "objective": {"kind": "simcse"}, "attention_dropout": 0.3, **stage},
        ],
        "logging": {"progress": False, "tensorboard": False},
    })
    outcomes = Trainer(cfg).run()
    final = outcomes[-1].final_dir
    assert all(o.last_loss is not None and np.isfinite(o.last_loss) for o in outcomes)
    enc = Encoder.from_pretrained(final)
    check_bidirectional(enc.backbone)
    texts = ["A cat sat on the mat.", "Stock markets fell sharply today.", "The kitten rested on the rug."]
    ours = enc.encode(texts, instruction="Retrieve semantically similar text")
    st = SentenceTransformer(str(final), device="cpu")
    theirs = st.encode(texts, prompt=enc.format_instruction("Retrieve semantically similar text"), normalize_embeddings=True)
    assert np.abs(ours - theirs).max() <= 1e-4
    sims = ours @ ours.T
    assert sims[0, 2] > sims[0, 1]  # real weights: cat/kitten closer than cat/stocks
