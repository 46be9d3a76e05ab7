"""Convert a GGUF checkpoint (the only real LLM weights available offline) into a plain HF folder.

transformers de-quantizes GGUF to float32 on load, but that load takes 0.5-2 minutes and
`save_pretrained` refuses a GGUF-loaded model; we convert once, atomically, and reuse the folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from toolkit.atomic import atomic_dir
from toolkit.errors import InputError, MissingPathError

MARKER = "embedforge-gguf.json"  # written last: its presence means the folder is complete
GGUF_MAGIC = b"GGUF"


def is_imported(out_dir: Path) -> bool:
    return (Path(out_dir) / MARKER).is_file()


def check_gguf_file(gguf_path: Path) -> Path:
    """Fail early and clearly: a missing file or a non-GGUF file would give a cryptic loader error."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise MissingPathError(f"{gguf_path}: GGUF file not found")
    with gguf_path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise InputError(f"{gguf_path}: not a GGUF file (first bytes {magic!r}, expected {GGUF_MAGIC!r})")
    return gguf_path


def import_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantize `gguf_path` to float32 and save model + tokenizer as an HF folder at `out_dir`.

    Returns `out_dir` at once when a previous import completed there (marker file present).
    """
    out_dir = Path(out_dir)
    if is_imported(out_dir):
        return out_dir
    gguf_path = check_gguf_file(gguf_path).resolve()
    for pkg in ("gguf", "accelerate"):
        try:
            __import__(pkg)
        except ImportError as exc:
            raise ImportError(f"loading GGUF needs the {pkg!r} package: pip install {pkg}") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    kwargs = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    # save_pretrained refuses a quantizer-tagged model; the weights are already plain float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.pad_token is None:  # batched embedding needs padding
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"source": str(gguf_path), "size": gguf_path.stat().st_size,
                "architecture": type(model).__name__, "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / MARKER).write_text(json.dumps(info, indent=1))
    return out_dir
