"""Peak memory of the megatron engine's export, per rank: TP2 x PP2 (4 gloo processes) and 1 rank.

A random Llama of a few hundred MB (fp32) is built by the megatron engine in each layout; each rank
then records its resident set (VmRSS), resets its high-water mark (`/proc/self/clear_refs` 5) and
runs `end_stage` (the sharded encoder folder); the peak extra is VmHWM - VmRSS before the export, so
the build does not count. A third measurement saves a step checkpoint (1 rank) and streams it
(`embedforge export`'s path) in a fresh process, again counting from after the imports.
sentence-transformers is imported before measuring (its import is a fixed cost, not the export's).

The stated bound (hf_export / step_export docstrings): 2 x the largest unit in HF layout (one
layer or the embedding at its padded size), which the table prints beside each rank's own shard.

    PYTHONPATH=. .venv/bin/python bench/export_memory.py [--layers 8 --hidden 1024 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bench.common import make_model, reset_peak, status  # noqa: E402


def run_config(model_dir: Path, tp: int, pp: int):
    from toolkit.config import config_from_dict

    return config_from_dict({
        "output_dir": "unused", "seed": 1, "engine": "megatron", "parallel": {"tp": tp, "pp": pp},
        "model": {"path": str(model_dir), "max_length": 64}, "pooling": {"mode": "mean"},
        "stages": [{"name": "s", "steps": 1, "lora": {"enabled": False}, "data": {"path": "x", "max_length": 64},
                    "objective": {"kind": "supervised"}}],
    })


def bound_bytes(arch) -> int:
    """2 x the largest unit (a layer, or the embedding padded for any TP up to 8), fp32."""
    from toolkit.engines.megatron.convert import hf_layer_shapes

    layer = sum(torch.Size(s).numel() for s in hf_layer_shapes(arch, 0).values())
    return 2 * 4 * max(layer, arch.padded_vocab(8) * arch.hidden_size)


def _worker(rank: int, world: int, port: int, model_dir: str, tp: int, pp: int, out: str, save_step: bool):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import sentence_transformers  # noqa: F401  (a fixed import cost, paid before measuring)

        from toolkit.distributed.parallel_dims import ParallelDims
        from toolkit.engines.megatron.engine import MegatronEngine

        cfg = run_config(Path(model_dir), tp, pp)
        dims = ParallelDims.from_config(cfg.parallel, world, rank)
        engine = MegatronEngine(cfg, dims)
        engine.build(add_mask_token=False)
        own = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        dist.barrier()
        before = status("VmRSS")
        reset_peak()
        engine.end_stage(Path(out) / f"final-{world}")
        peak = status("VmHWM") - before
        row = {"layout": f"tp{tp} pp{pp}", "rank": rank, "tp_rank": dims.tp_rank, "pp_rank": dims.pp_rank,
               "own_shard": own, "before": before, "peak_extra": peak}
        if save_step:  # a full-weights step checkpoint for the streaming export
            stage = cfg.stages[0]
            engine.begin_stage(0, stage, data_kind="pair", generator=torch.Generator())
            engine.save(Path(out) / "step-1")
        (Path(out) / f"row-{world}-{rank}.json").write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def _stream_worker(model_dir: str, out: str, queue) -> None:
    import sentence_transformers  # noqa: F401  (fixed import costs, paid before measuring)
    from transformers import AutoModel  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    from toolkit.distributed.parallel_dims import init_single_process_group
    from toolkit.engines.megatron.step_export import export_step_streaming

    torch.set_num_threads(1)
    init_single_process_group()
    cfg = run_config(Path(model_dir), 1, 1)
    before = status("VmRSS")
    reset_peak()
    export_step_streaming(cfg, 0, Path(out) / "step-1", Path(out) / "streamed")
    queue.put((before, status("VmHWM") - before))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    from tests.helpers import free_port
    from toolkit.models.arch import ModelArgs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_model(tmp / "model", args.layers, args.hidden, args.vocab)
        from transformers import AutoConfig

        arch = ModelArgs.from_hf_config(AutoConfig.from_pretrained(model_dir))
        total = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        for world, tp, pp in ((4, 2, 2), (1, 1, 1)):
            mp.spawn(_worker, args=(world, free_port(), str(model_dir), tp, pp, str(tmp), world == 1),
                     nprocs=world, join=True)
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_stream_worker, args=(str(model_dir), str(tmp), queue))
        proc.start()
        streamed_before, streamed = queue.get()
        proc.join()
        rows = [json.loads(p.read_text()) for p in sorted(tmp.glob("row-*.json"), key=lambda p: p.name)]
        bound = bound_bytes(arch)
        mb = 2**20
        print(f"model: {arch.num_layers} layers, hidden {arch.hidden_size}, vocab {arch.vocab_size}; "
              f"HF checkpoint {total / mb:.0f} MB (fp32, with its LM head)")
        print(f"bound: 2 x largest unit = {bound / mb:.0f} MB")
        print("| layout | rank | (tp, pp) | own shard MB | RSS before export MB | peak extra during export MB "
              "| bound MB |")
        print("|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["layout"], r["rank"])):
            print(f"| {r['layout']} | {r['rank']} | ({r['tp_rank']}, {r['pp_rank']}) | {r['own_shard'] / mb:.0f} "
                  f"| {r['before'] / mb:.0f} | {r['peak_extra'] / mb:.0f} | {bound / mb:.0f} |")
        print(f"| step-N streamed (1 process) | 0 | - | 0 | {streamed_before / mb:.0f} | {streamed / mb:.0f} "
              f"| {bound / mb:.0f} |")
        print("peak extra = VmHWM during export - VmRSS just before it (memory freed earlier but still resident "
              "is reused without showing here)")


if __name__ == "__main__":
    main()
