"""Optimizer helpers shared by every engine: the learning-rate schedule."""

from __future__ import annotations

import math

from toolkit.config import ScheduleConfig


def lr_lambda(schedule: ScheduleConfig, total_steps: int):
    """Multiplier on the base lr: linear warmup, then linear / cosine decay to min_lr_ratio."""

    def fn(step: int) -> float:
        if schedule.warmup_steps and step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        if schedule.decay == "constant":
            return 1.0
        span = max(1, total_steps - schedule.warmup_steps)
        progress = min(1.0, (step - schedule.warmup_steps) / span)
        decay = 1 - progress if schedule.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * decay

    return fn
