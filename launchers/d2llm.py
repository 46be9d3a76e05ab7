"""`embedforge d2llm quickstart`: the D2LLM demonstration on real weights (launchers/d2llm_quickstart.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from launchers.intermixed import take_overrides_anywhere
from launchers.recipes import RECIPES_DIR


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("d2llm", help="D2LLM: the CPU quickstart (teacher fine-tuning -> student -> comparison)")
    sub = p.add_subparsers(dest="d2llm_command", required=True)
    q = sub.add_parser("quickstart", help="fine-tune the teacher, score, distil and compare on real SmolLM2 "
                                          "weights and WordNet",
                       description="Fine-tune SmolLM2-135M-Instruct as a yes/no teacher on WordNet training families, "
                                   "score the training pairs with it, train the D2LLM student and a contrastive-only "
                                   "baseline, and compare them on held-out families.")
    q.add_argument("--config", default=str(RECIPES_DIR / "d2llm" / "quickstart.yaml"), help="the student recipe")
    q.add_argument("--teacher-config", default=str(RECIPES_DIR / "d2llm" / "teacher.yaml"), help="the teacher recipe")
    q.add_argument("overrides", nargs="*", help="key.sub=value overrides of the student recipe")
    q.add_argument("--train-queries", type=int, default=384, help="WordNet training queries (teacher and student data)")
    q.add_argument("--eval-queries", type=int, default=64)
    q.add_argument("--candidates", type=int, default=8, help="candidates reranked per held-out query")
    q.add_argument("--resume", default="auto")
    q.set_defaults(func=_quickstart)
    take_overrides_anywhere(q)
    return p


def _quickstart(args: argparse.Namespace) -> int:
    from launchers.d2llm_quickstart import run_d2llm_quickstart

    run_d2llm_quickstart(Path(args.config), args.overrides, teacher_config=Path(args.teacher_config),
                         n_train=args.train_queries, n_eval=args.eval_queries, n_candidates=args.candidates,
                         resume=args.resume)
    return 0
