"""Every seed a run derives from `cfg.seed`, in one place.

Changing a formula here changes every trajectory (and breaks bit-identical resume of old runs), so
each derived seed is a named function, never an inline expression.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_seed(run_seed: int, index: int) -> int:
    """Stage `index`'s seed: its data order, masks, dropout and fresh adapters start here."""
    return run_seed + 1000 * (index + 1)


def mask_seed(run_seed: int, index: int, dp_rank: int) -> int:
    """MNTP masks / SimCSE views differ across DP replicas (equal within one: its TP / PP ranks agree);
    DP replica 0 keeps the stage seed."""
    return stage_seed(run_seed, index) + 7919 * dp_rank


def pipeline_dropout_seed(run_seed: int, index: int, pp_rank: int) -> int:
    """Dropout streams per pipeline stage (layer k of stage 0 and of stage 1 must not share masks)."""
    return stage_seed(run_seed, index) + 100 * pp_rank


def iem_seed(run_seed: int, index: int) -> int:
    """A D2LLM stage's fresh Interaction Emulation Module (the same on every engine)."""
    return run_seed + 17 * (index + 1)


def head_seed(run_seed: int) -> int:
    """The pooling head's initial weights (the same on every engine)."""
    return run_seed
