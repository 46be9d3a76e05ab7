"""Shared plumbing for the side-by-side benchmarks: real model + data, worker processes, tables.

Each (implementation, workload) runs in its own fresh process so peak memory is per run, one after
the other on the same machine, and the table reports ratios (Embedforge / llm2vec) of one sitting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS_PY = ROOT / ".venv" / "bin" / "python"
REF_PY = ROOT / ".venv-llm2vec" / "bin" / "python"


def prepare(model_spec: str, n_texts: int, workdir: Path) -> tuple[Path, Path, Path]:
    """(HF model folder, texts JSONL, triples JSONL) from the packaged real assets."""
    sys.path.insert(0, str(ROOT))
    from toolkit.asset_splits import wordnet_training_pairs
    from toolkit.assets import nlp_corpus_sentences, resolve_model_path

    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_path(model_spec)
    texts = workdir / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in nlp_corpus_sentences(limit=n_texts)))
    triples = workdir / "triples.jsonl"
    fields = ("query", "positive", "negative", "instruction")
    triples.write_text("".join(json.dumps({k: r[k] for k in fields}) + "\n" for r in wordnet_training_pairs(n_texts)))
    return model_dir, texts, triples


def run_worker(impl: str, workload: str, model_dir: Path, data: Path, args) -> dict:
    if impl.startswith("embedforge"):
        cmd = [str(OURS_PY), str(ROOT / "bench" / "embedforge_worker.py")]
        cmd += ["--batching", "bucketed"] if impl == "embedforge-bucketed" else []
    else:
        if not REF_PY.exists():
            return {"impl": impl, "workload": workload, "error": "reference venv missing: bash bench/setup_reference_env.sh"}
        cmd = [str(REF_PY), str(ROOT / "bench" / "reference_llm2vec.py")]
    cmd += ["--model", str(model_dir), "--workload", workload, "--batch-size", str(args.batch_size),
            "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
            "--threads", str(args.threads), "--texts", str(data)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"impl": impl, "workload": workload, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1])


def gemm_peak_flops(threads: int, n: int = 2048, repeats: int = 10, device: str = "cpu", dtype: str = "float32") -> float:
    """This machine's GEMM peak (fp32 on CPU at `threads` threads; e.g. bf16 on a GPU), measured: the
    best of `repeats` n x n matmuls (MFU's denominator; a vendor's nominal peak would hide what torch
    can reach here)."""
    import time

    import torch

    torch.set_num_threads(threads)
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up: thread pool, caches, kernel selection
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def table(results: list[dict], peak_flops: float | None = None) -> str:
    """Markdown: per workload, both implementations and the speed / memory ratios; with the measured
    GEMM peak, each workload's model-FLOPs utilisation (MFU) beside its tokens/s."""
    rows = ["| workload | impl | real tokens/s | model GFLOP/s | MFU | step s | peak RSS MB | loss |",
            "|---|---|---|---|---|---|---|---|"]
    by = {(r["workload"], r["impl"]): r for r in results}
    ratios = ["", "| workload | impl | speed-up vs llm2vec (real tokens/s) | peak memory ratio |", "|---|---|---|---|"]
    for workload in dict.fromkeys(r["workload"] for r in results):
        for impl in ("embedforge", "embedforge-bucketed", "llm2vec-0.2.3"):
            r = by.get((workload, impl))
            if r is None:
                continue
            if "error" in r:
                rows.append(f"| {workload} | {impl} | error: {r['error']} | | | | | |")
                continue
            loss = "" if r.get("loss") is None else f"{r['loss']:.4f}"
            achieved = r.get("model_flops_per_s")
            gflops = "" if achieved is None else f"{achieved / 1e9:,.1f}"
            mfu = "" if achieved is None or not peak_flops else f"{achieved / peak_flops:.1%}"
            rows.append(f"| {workload} | {impl} | {r['tokens_per_s']:,.0f} | {gflops} | {mfu} | {r['step_s']:.3f} "
                        f"| {r['peak_rss_mb']:,.0f} | {loss} |")
        b = by.get((workload, "llm2vec-0.2.3"))
        for impl in ("embedforge", "embedforge-bucketed"):
            a = by.get((workload, impl))
            if a and b and "error" not in a and "error" not in b:
                ratios.append(f"| {workload} | {impl} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x "
                              f"| {a['peak_rss_mb'] / b['peak_rss_mb']:.2f} |")
    return "\n".join(rows + ratios)


# ------------------------------------------------------------------ per-process memory
def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def make_model(folder: Path, layers: int, hidden: int, vocab: int, **overrides) -> Path:
    """A random fp32 Llama (the tests' tiny tokenizer; the vocabulary rows beyond it are never used)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.helpers import build_tokenizer
    from toolkit.models.tiny import tiny_config

    tok = build_tokenizer()
    cfg = tiny_config("llama", vocab_size=vocab, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, num_hidden_layers=layers, hidden_size=hidden,
                      intermediate_size=hidden * 11 // 4, num_attention_heads=hidden // 128,
                      num_key_value_heads=max(hidden // 256, 2), head_dim=128, **overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
