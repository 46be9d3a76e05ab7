"""`embedforge eval run | sweep | compare`: mteb evaluation of models and checkpoints, sweeps over
them, and a regression check (see launchers/eval_run.py and launchers/eval_sweep.py)."""

from __future__ import annotations

import argparse

from launchers import eval_run, eval_sweep


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate encoders and checkpoints with mteb (run, sweep, compare)")
    sub = p.add_subparsers(dest="eval_command", required=True)
    eval_run.add_parser(sub)
    eval_sweep.add_parsers(sub)
    return p
