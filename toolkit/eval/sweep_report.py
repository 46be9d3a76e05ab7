"""A sweep's results as files a person reads: a CSV and a Markdown table (model x task), the score of
every task against the training step (one line per run, baselines as dashed levels), and a model x
task heatmap, as PNGs. Rows come from the result cache, so the report is the same after a rerun."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import InputError


@dataclass(frozen=True)
class ResultRow:
    model: str
    task: str
    score: float  # mteb's main score of the task, x 100
    metric: str
    run: str | None = None
    stage: str | None = None
    step: int | None = None


def write_report(rows: list[ResultRow], out: Path, title: str = "Embedforge evaluation sweep") -> dict[str, Path]:
    """results.json, results.csv, results.md, score_vs_step.png and heatmap.png under `out`."""
    if not rows:
        raise InputError("no results to report")
    out.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(r.model for r in rows))
    tasks = sorted({r.task for r in rows})
    files = {"json": out / "results.json", "csv": out / "results.csv", "markdown": out / "results.md",
             "steps_plot": out / "score_vs_step.png", "heatmap": out / "heatmap.png"}
    files["json"].write_text(json.dumps({"rows": [r.__dict__ for r in rows]}, indent=1))
    with files["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "run", "stage", "step", "task", "metric", "score"])
        for r in rows:
            w.writerow([r.model, r.run or "", r.stage or "", "" if r.step is None else r.step, r.task, r.metric,
                        f"{r.score:.4f}"])
    files["markdown"].write_text(markdown_table(rows, models, tasks, title))
    _plot_steps(rows, tasks, files["steps_plot"])
    _plot_heatmap(rows, models, tasks, files["heatmap"])
    return files


def markdown_table(rows: list[ResultRow], models: list[str], tasks: list[str], title: str) -> str:
    score = {(r.model, r.task): r for r in rows}
    metric = {r.task: r.metric for r in rows}
    lines = [f"# {title}", "", "| model | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for m in models:
        cells = [f"{score[(m, t)].score:.2f}" if (m, t) in score else "-" for t in tasks]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def _plot_steps(rows: list[ResultRow], tasks: list[str], path: Path) -> None:
    plt = _pyplot()
    cols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        here = [r for r in rows if r.task == task]
        for run in sorted({r.run for r in here if r.run is not None}):
            points = sorted((r.step, r.score) for r in here if r.run == run and r.step is not None)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=run)
        for r in here:
            if r.run is None:  # a baseline or a folder outside a run: a level to compare against
                ax.axhline(r.score, linestyle="--", linewidth=1, color="gray")
                ax.annotate(r.model, xy=(0.01, r.score), xycoords=("axes fraction", "data"), textcoords="offset points",
                            xytext=(0, 2), fontsize=7, color="gray")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel(here[0].metric if here else "score")
        ax.grid(alpha=0.3)
        if any(r.run for r in here):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_heatmap(rows: list[ResultRow], models: list[str], tasks: list[str], path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    grid = np.full((len(models), len(tasks)), np.nan)
    for r in rows:
        grid[models.index(r.model), tasks.index(r.task)] = r.score
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 0.9 + 0.45 * len(models)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    middle = np.nanmean(grid)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    for i in range(len(models)):
        for j in range(len(tasks)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="black" if grid[i, j] > middle else "white")  # readable on light and dark cells
    fig.colorbar(image, ax=ax, label="main score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_rows(path: Path) -> list[ResultRow]:
    data = json.loads(Path(path).read_text())
    return [ResultRow(**r) for r in data["rows"]]
