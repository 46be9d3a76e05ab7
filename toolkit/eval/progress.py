"""Progress of a long evaluation on stderr: which model, which task, texts encoded of the total, elapsed.

Encoding a task's texts can take minutes on a CPU; without these lines `eval run` looks hung. One line
when an encode call starts, one every `every_s` seconds while it runs, one when it ends.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class EncodeProgress:
    def __init__(self, model: str, *, every_s: float = 10.0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, quiet: bool = False):
        """`quiet`: a rank that is not rank 0 keeps one too, printing nothing, so that every rank of a
        model-parallel group splits its encoding the same way (mteb_model._encode_reporting)."""
        self.model, self.every_s, self.stream, self.clock, self.quiet = model, every_s, stream, clock, quiet
        self.task = ""
        self.what = ""
        self.total = 0
        self.task_start = 0.0
        self._last = 0.0

    def begin(self, task: str, what: str, total: int) -> None:
        """An encode call of `total` texts for `task` (`what`: its split and text kind); the elapsed time
        counts from the task's first call."""
        now = self.clock()
        if task != self.task:
            self.task, self.task_start = task, now
        self.what, self.total, self._last = what, total, now
        self._line(f"encoding {total} texts")

    def advance(self, done: int) -> None:
        """`done` of this call's texts are encoded (a line at most every `every_s` seconds, and at the end)."""
        now = self.clock()
        if done >= self.total or now - self._last >= self.every_s:
            self._last = now
            self._line(f"{min(done, self.total)}/{self.total} texts encoded")

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        elapsed = self.clock() - self.task_start
        print(f"eval: {self.model} | {self.task} {self.what}: {text}, {elapsed:.0f} s", file=self.stream or sys.stderr,
              flush=True)
