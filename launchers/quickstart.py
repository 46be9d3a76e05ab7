"""The CPU quickstart: train the recipe's stages, then compare every stage on held-out tasks.

Rows: the causal model (mean pooling), the same model made bidirectional (untrained), the model
after each stage, and all-MiniLM-L6-v2 as an encoder baseline, on the same tasks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from toolkit.config import load_config
from toolkit.errors import EmbedforgeError
from toolkit.eval.report import evaluate_models, format_table
from toolkit.models.folder import serving_length
from toolkit.models.loading import build_encoder
from toolkit.train import Trainer


def run_quickstart(config: Path, overrides: list[str], resume: str = "auto") -> dict:
    cfg = load_config(config, overrides)
    tasks = cfg.eval.tasks or ["rt-sentiment", "wordnet-retrieval"]
    t0 = time.perf_counter()
    outcomes = Trainer(cfg, resume=resume).run()
    train_s = time.perf_counter() - t0
    unfinished = [o.name for o in outcomes if o.final_dir is None]
    if unfinished or len(outcomes) != len(cfg.stages):
        raise EmbedforgeError(f"training stopped before the end (stages {unfinished}); rerun to resume")

    models: dict = {}
    for label, bidirectional in (("causal (untrained)", False), ("bidirectional (untrained)", True)):
        encoder, _ = build_encoder(cfg.model, cfg.pooling, seed=cfg.seed, bidirectional=bidirectional)
        encoder.spec.max_length = serving_length(cfg, encoder.backbone.config)  # as the trained folders encode
        models[label] = encoder.eval()
    trained = []
    for o in outcomes:
        trained.append(o.name)
        models["bidirectional + " + " + ".join(trained)] = str(o.final_dir)
    models["all-MiniLM-L6-v2 (baseline)"] = "minilm"
    t1 = time.perf_counter()
    results = evaluate_models(models, tasks, batch_size=cfg.eval.batch_size, task_sizes=cfg.eval.task_sizes)
    eval_s = time.perf_counter() - t1
    table = format_table(results, tasks)
    out = Path(cfg.output_dir)
    (out / "quickstart_results.json").write_text(json.dumps({"results": results, "train_seconds": train_s,
                                                             "eval_seconds": eval_s}, indent=2))
    (out / "quickstart_table.md").write_text(table + "\n")
    print(f"\nQuickstart: training {train_s:.0f} s, evaluation {eval_s:.0f} s; final model {outcomes[-1].final_dir}\n")
    print(table)
    return results
