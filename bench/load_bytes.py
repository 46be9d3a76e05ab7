"""Bytes each rank reads while loading HF weights into its megatron shard, per TP / PP layout.

Why: at 70B / 405B a rank must read about its share of the checkpoint, not the whole of it. Each
(layout, rank) loads in a fresh process (`--worker`): the model's safetensors files are first
dropped from the page cache (posix_fadvise DONTNEED on a private copy, so no other process's reads
are counted or disturbed), then `HFWeights` + `hf_to_megatron` build that rank's shard, and the
process reports
- requested: the bytes the conversion asked for (HFWeights.requested_bytes), and
- disk: /proc/self/io read_bytes, what the kernel read from the device for the memory-mapped file
  (whole pages plus read-ahead), measured after the shard was copied out of the file's mapping.
Read paths: "pread" (HFWeights' default: positioned reads of the slices), "get_slice" (safetensors'
memory-mapped slices, `--whole`) and "whole" (the previous behaviour: each tensor read whole, then
cut; `--whole`), the last two at the largest TP only.

    PYTHONPATH=. .venv/bin/python bench/load_bytes.py [--model DIR | asset name] [--whole]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
# --model random: llama-shaped, GQA, vocabulary not divisible by 2 or 4, bf16 (~330 MiB); TP 1 / 2 / 4
RANDOM = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=8, vocab_size=32003, tie_word_embeddings=False)


def layouts(arch) -> list[tuple[int, int, int, int]]:
    """(tp, pp, first, last): every TP in 1..4 these shapes split into, TP x PP2, and an uneven PP4."""
    tps = [t for t in (1, 2, 3, 4) if not (arch.num_heads % t or arch.num_kv_heads % t or arch.ffn_hidden_size % t)]
    out = [(t, 1, 0, 0) for t in tps] + [(tps[-1], 2, 0, 0)]
    for f in range(arch.num_layers // 4 - 1, 0, -1):
        if (arch.num_layers - 2 * f) % 2 == 0:
            return out + [(1, 4, f, f)]
    return out


def _io() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


def _evict(folder: Path) -> None:
    for file in folder.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a fresh copy) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class _Whole(Mapping):
    """The old read path: every tensor whole (the conversion then cuts this rank's piece)."""

    def __init__(self, weights):
        self.weights = weights

    def __getitem__(self, name):
        return self.weights.read(name)

    def __contains__(self, name):
        return name in self.weights

    def __iter__(self):
        return iter(self.weights)

    def __len__(self):
        return len(self.weights)


def worker(args) -> None:
    import torch
    from transformers import AutoConfig

    from toolkit.engines.megatron.convert import hf_to_megatron
    from toolkit.engines.megatron.weights import HFWeights
    from toolkit.models.arch import ModelArgs

    folder = Path(args.model)
    arch = ModelArgs.from_hf_config(AutoConfig.from_pretrained(folder))
    _evict(folder)
    before = _io()
    with HFWeights(folder, reader=args.reader) as weights:
        source = _Whole(weights) if args.whole else weights
        shard = hf_to_megatron(source, arch, tp=args.tp, tp_rank=args.tp_rank, pp=args.pp, pp_rank=args.pp_rank,
                               first_stage_layers=args.first, last_stage_layers=args.last)
        requested = weights.requested_bytes
        # what the engine's load_state_dict does: copy into the model's own memory (a tensor from
        # safetensors may still be a lazy view of the memory-mapped file until it is read)
        shard = {k: torch.empty_like(v).copy_(v) for k, v in shard.items()}
    after = _io()
    print(json.dumps({"requested": requested, "disk": after["read_bytes"] - before["read_bytes"],
                      "shard": sum(t.numel() * t.element_size() for t in shard.values())}))


def _tensor_bytes(folder: Path) -> int:
    """Tensor data in the folder's safetensors files (each file less its 8-byte length and JSON header)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            total += file.stat().st_size - 8 - int.from_bytes(f.read(8), "little")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="HF folder or asset name (toolkit/assets.py)")
    parser.add_argument("--whole", action="store_true", help="also measure get_slice (mmap) and the whole-tensor "
                        "read path (the previous behaviour) at the largest TP")
    parser.add_argument("--reader", default="pread", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("tp", "tp-rank", "pp", "pp-rank", "first", "last"):
        parser.add_argument(f"--{name}", type=int, default=0)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(ROOT))
    from toolkit.assets import resolve_model_path
    from toolkit.models.arch import read_model_args

    with tempfile.TemporaryDirectory(prefix="load_bytes-") as tmp:
        folder = Path(tmp) / "model"  # a private copy: its page cache is this benchmark's alone
        if args.model == "random":
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**RANDOM)).to(torch.bfloat16)
            model.save_pretrained(folder)
            source = "random llama " + json.dumps(RANDOM)
            del model
        else:
            source = Path(args.model) if Path(args.model).is_dir() else resolve_model_path(f"asset:{args.model}")
            shutil.copytree(source, folder)
        arch = read_model_args(folder / "config.json")
        total_file = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        total = _tensor_bytes(folder)
        print(f"model: {source} ({total / MIB:.1f} MiB of tensors in {total_file / MIB:.1f} MiB of safetensors)")
        print(f"{'read path':<9} {'layout':<22} {'rank':<8} {'shard MiB':>10} {'requested MiB':>14} "
              f"{'disk MiB':>9} {'requested %':>12} {'disk %':>7} {'1/(tp*pp) %':>12}")
        largest_tp = max(t for t, p, _, _ in layouts(arch) if p == 1)
        modes = [("pread", False)] + ([("mmap", False), ("mmap", True)] if args.whole else [])
        for reader, whole in modes:
            for tp, pp, first, last in layouts(arch):
                if reader == "mmap" and (tp, pp) != (largest_tp, 1):
                    continue  # the baselines at the largest TP only
                layout = f"tp{tp} pp{pp}" + (f" ({first}+..+{last})" if first or last else "")
                for p in range(pp):
                    for t in range(tp):
                        cmd = [sys.executable, __file__, "--worker", "--model", str(folder), "--tp", str(tp),
                               "--tp-rank", str(t), "--pp", str(pp), "--pp-rank", str(p), "--first", str(first),
                               "--last", str(last), "--reader", reader] + (["--whole"] if whole else [])
                        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
                        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                        r = json.loads(proc.stdout.strip().splitlines()[-1])
                        path = "whole" if whole else ("pread" if reader == "pread" else "get_slice")
                        print(f"{path:<9} {layout:<22} {f'tp{t} pp{p}':<8} "
                              f"{r['shard'] / MIB:>10.1f} {r['requested'] / MIB:>14.1f} {r['disk'] / MIB:>9.1f} "
                              f"{100 * r['requested'] / total:>11.1f}% {100 * r['disk'] / total_file:>6.1f}% "
                              f"{100 / (tp * pp):>11.1f}%", flush=True)


if __name__ == "__main__":
    main()
