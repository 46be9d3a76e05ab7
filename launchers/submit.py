"""`embedforge submit slurm|ray`: run a recipe on a cluster, unchanged from a local run.

Both paths validate the recipe here first, so a bad config never reaches a queue; the training
code they start is the same `embedforge train` a laptop runs.
"""

from __future__ import annotations

import argparse

from launchers import ray_submit, slurm


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("submit", help="submit a recipe to a SLURM or Ray cluster")
    sub = p.add_subparsers(dest="submit_command", required=True)
    slurm.add_parser(sub)
    ray_submit.add_parser(sub)
    return p
