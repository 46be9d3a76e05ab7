"""Evaluate several encoders on the local tasks and print one comparison table."""

from __future__ import annotations

import time
from typing import Callable, Mapping, Union

import numpy as np

from toolkit.eval.baselines import minilm_encoder
from toolkit.eval.local_tasks import get_task
from toolkit.models.encoder import Encoder

EncodeFn = Callable[[list[str], Union[str, None]], np.ndarray]
ModelSpec = Union[str, Encoder, EncodeFn]


def as_encode_fn(spec: ModelSpec, batch_size: int = 32) -> EncodeFn:
    """'minilm' (the all-MiniLM-L6-v2 baseline), an encoder folder, an Encoder, or a callable."""
    if isinstance(spec, Encoder):
        return lambda texts, instruction: spec.encode(texts, instruction=instruction, batch_size=batch_size)
    if callable(spec):
        return spec
    if spec == "minilm":
        return minilm_encoder()
    return as_encode_fn(Encoder.from_pretrained(spec), batch_size)


def evaluate_models(
    models: Mapping[str, ModelSpec], tasks: list[str], batch_size: int = 32, task_sizes: Mapping[str, dict] | None = None
) -> dict:
    """{label: {task: {metric: value, ..., "seconds": wall time}}}; models are loaded one at a time."""
    results: dict = {}
    for label, spec in models.items():
        encode = as_encode_fn(spec, batch_size)
        results[label] = {}
        for name in tasks:
            t0 = time.perf_counter()
            scores = dict(get_task(name, **(task_sizes or {}).get(name, {})).evaluate(encode))
            scores["seconds"] = time.perf_counter() - t0
            results[label][name] = scores
        del encode
    return results


def format_table(results: dict, tasks: list[str]) -> str:
    """Markdown table of each task's main metric (x100) per model."""
    metrics = {t: get_task(t).main_metric for t in tasks}
    header = "| model | " + " | ".join(f"{t} ({metrics[t]})" for t in tasks) + " |"
    lines = [header, "|" + "---|" * (len(tasks) + 1)]
    for label, per_task in results.items():
        cells = [f"{100 * per_task[t][metrics[t]]:.2f}" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
