"""`embedforge eval compare BASELINE.json NEW.json`: per-task deltas, and a verdict for CI.

Both files are results files of `embedforge eval run --output` or `eval sweep` (`{"rows": [...]}`).
With one model in each file, tasks are compared by name (a new checkpoint against the old one);
with several, rows are matched by (model, task). A task of the baseline missing from the new
results is a failure too: a regression check must not pass by skipping work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import InputError, MissingPathError
from toolkit.eval.sweep_report import ResultRow, read_rows


@dataclass(frozen=True)
class Delta:
    key: str
    baseline: float
    new: float | None

    @property
    def delta(self) -> float | None:
        return None if self.new is None else self.new - self.baseline


def compare(baseline: list[ResultRow], new: list[ResultRow]) -> list[Delta]:
    single = len({r.model for r in baseline}) == 1 and len({r.model for r in new}) == 1

    def key(r: ResultRow) -> str:
        return r.task if single else f"{r.model} / {r.task}"

    new_by_key = {key(r): r.score for r in new}
    return [Delta(key(r), r.score, new_by_key.get(key(r))) for r in sorted(baseline, key=key)]


def regressions(deltas: list[Delta], threshold: float) -> list[Delta]:
    """Tasks that dropped by more than `threshold` points, or are missing from the new results."""
    return [d for d in deltas if d.delta is None or d.delta < -threshold]


def format_deltas(deltas: list[Delta], threshold: float) -> str:
    bad = {d.key for d in regressions(deltas, threshold)}
    width = max([len(d.key) for d in deltas] + [4])
    lines = [f"{'task':<{width}}  baseline      new    delta", "-" * (width + 32)]
    for d in deltas:
        new = "missing" if d.new is None else f"{d.new:8.2f}"
        delta = "" if d.delta is None else f"{d.delta:+8.2f}"
        lines.append(f"{d.key:<{width}}  {d.baseline:8.2f}  {new:>7}  {delta}{'  << REGRESSION' if d.key in bad else ''}")
    verdict = (f"{len(bad)} of {len(deltas)} task(s) dropped more than {threshold} points (or are missing)" if bad
               else f"no task dropped more than {threshold} points")
    return "\n".join(lines + ["", verdict]) + "\n"


def compare_files(baseline: Path, new: Path, threshold: float) -> tuple[str, bool]:
    """The printed report and whether the new results pass."""
    for path in (baseline, new):
        if not Path(path).is_file():
            raise MissingPathError(f"{path}: results file not found")
    try:
        deltas = compare(read_rows(baseline), read_rows(new))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{baseline} / {new}: not Embedforge results files ({{'rows': [...]}}): {exc}") from None
    if not deltas:
        raise InputError(f"{baseline}: no results to compare")
    return format_deltas(deltas, threshold), not regressions(deltas, threshold)
