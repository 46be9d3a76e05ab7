"""Saves that finish later: the handle an engine returns, and the trainer's one save in flight.

An engine's `begin_save` writes (or only stages) its part of a step and returns a `SaveHandle`; a
synchronous engine returns one that is already done. The step is committed (checksums in meta.json,
COMPLETE, rename, prune: `manager.commit_step_dir`) only once `done()` says every rank's write
finished and `verify()` found the files, so a process killed at any moment leaves either no new
step or a complete one. At most one save is in flight: a new save, the stage's end and a graceful
stop wait for it; an error abandons it (its `.step-N.partial` never gets COMPLETE, and the next
start removes it), leaving the previous complete step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.checkpoint.manager import commit_step_dir

log = logging.getLogger(__name__)


class SaveHandle:
    """One rank's part of a save. This base class is a save that was fully written when returned."""

    asynchronous = False

    def done(self, *, wait: bool) -> bool:
        """Whether every rank's write finished (a collective when asynchronous: every rank calls at
        the same point and gets the same answer); `wait` blocks until it has."""
        return True

    def verify(self) -> None:
        """After `done()`: check the written files before the step is marked complete; raises if not."""

    def abandon(self) -> None:
        """Stop a background write without committing it (after an error: no collective)."""


@dataclass
class _InFlight:
    handle: SaveHandle
    tmp: Path
    meta: dict[str, Any]
    started: float  # perf_counter at the save's start


@dataclass
class SaveTracker:
    """The trainer's saves of one stage: commits each when its write is done, one in flight at most,
    and measures them (`slowest_s`: the longest from a save's start until it was committed, which
    the deadline backstop keeps room for; `blocked_s`: how long each save held up the loop)."""

    rank: int
    keep_last: int
    slowest_s: float = 0.0
    blocked_s: list[float] = field(default_factory=list)
    _pending: _InFlight | None = None

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def started(self, handle: SaveHandle, tmp: Path, meta: dict[str, Any], started: float) -> Path | None:
        """Record a save whose files `handle` writes; commits it now when it is synchronous."""
        if self._pending is not None:
            raise RuntimeError("a save was started while another one is in flight")
        self.blocked_s.append(time.perf_counter() - started)
        self._pending = _InFlight(handle, tmp, meta, started)
        return None if handle.asynchronous else self.finish()

    def poll(self) -> Path | None:
        """At a step boundary (every rank): commit the save in flight if every rank's write is done."""
        if self._pending is None or not self._pending.handle.done(wait=False):
            return None
        return self._commit()

    def finish(self) -> Path | None:
        """Wait for the save in flight (every rank) and commit it; its step-N/ (None when none was)."""
        if self._pending is None:
            return None
        self._pending.handle.done(wait=True)
        return self._commit()

    def abandon(self) -> None:
        """After an error: stop the background write; the step stays `.step-N.partial` (never resumed)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            log.warning("%s: abandoning the save in flight (an error stopped the run)", pending.tmp)
            pending.handle.abandon()

    def _commit(self) -> Path:
        pending, self._pending = self._pending, None
        assert pending is not None
        pending.handle.verify()
        final = commit_step_dir(pending.tmp, pending.meta, self.rank, self.keep_last)
        seconds = time.perf_counter() - pending.started
        self.slowest_s = max(self.slowest_s, seconds)
        if self.rank == 0:
            log.info("%s: committed %.2f s after the save began (%s; the loop was held %.2f s)", final, seconds,
                     "async" if pending.handle.asynchronous else "sync", self.blocked_s[-1])
        return final
