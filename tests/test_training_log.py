"""metrics.jsonl is strict JSON: a non-finite number is written as null (issue 16, docs/failure.md)."""

from __future__ import annotations

import json
import math

from toolkit.config import LoggingConfig
from toolkit.training_log import TrainingLog


def strict(text: str):
    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_nan_loss_is_written_as_null(tmp_path):
    tlog = TrainingLog(tmp_path, "mntp", 3, LoggingConfig(every_steps=1, tensorboard=True, progress=False))
    tlog.step(1, 0.5, 1e-3, 10, 0.1, 1.0)
    tlog.step(2, math.nan, 1e-3, 10, 0.1, math.inf)
    tlog.close()
    rows = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == 0.5
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None and rows[1]["step"] == 2
