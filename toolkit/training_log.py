"""Training telemetry: a progress bar (loss, tokens/s, ETA), TensorBoard scalars, metrics.jsonl."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from toolkit.config import LoggingConfig


class TrainingLog:
    def __init__(self, out_dir: Path, stage: str, total_steps: int, cfg: LoggingConfig, start_step: int = 0,
                 write_metrics: bool = True):
        """`write_metrics=False` (every rank but the logging one) keeps the window arithmetic only."""
        self.stage, self.cfg = stage, cfg
        self.metrics = (out_dir / "metrics.jsonl").open("a") if write_metrics else None
        self.writer = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard" / stage))
        self.bar = None
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)
        self._window_tokens = 0
        self._window_time = 0.0

    def step(self, step: int, loss: float, lr: float, tokens: int, seconds: float, grad_norm: float,
             skipped: bool = False) -> None:
        """A skipped (non-finite) step is always written, with "skipped": true."""
        self._window_tokens += tokens
        self._window_time += seconds
        tps = tokens / max(seconds, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}", refresh=False)
        if step % max(1, self.cfg.every_steps) == 0 or step == 1 or skipped:
            window_tps = self._window_tokens / max(self._window_time, 1e-9)
            record = {"stage": self.stage, "step": step, "loss": loss, "lr": lr, "tokens_per_s": window_tps,
                      "grad_norm": grad_norm}
            if skipped:
                record["skipped"] = True
            if self.metrics is not None:
                self.metrics.write(json.dumps(_strict(record), allow_nan=False) + "\n")
                self.metrics.flush()
            if self.writer is not None:
                for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
                    self.writer.add_scalar(f"{self.stage}/{key}", record[key], step)
            self._window_tokens, self._window_time = 0, 0.0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.metrics is not None:
            self.metrics.close()


def _strict(record: dict) -> dict:
    """NaN / inf as null: bare `NaN` is not JSON, and a strict reader (jq, json.loads with parse_constant,
    other languages) would fail on the very line that records a diverging run."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
