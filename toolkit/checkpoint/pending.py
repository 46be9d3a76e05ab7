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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.checkpoint.manager import commit_step_dir, final_name, mark_complete

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
    held: float = 0.0  # seconds the loop was held by it so far
    error: BaseException | None = None  # from the background commit (rank 0)
    done: float | None = None  # perf_counter when the background commit ended


@dataclass
class SaveTracker:
    """The trainer's saves: commits each when its write is done, one in flight at most, and measures
    them (`slowest_s`: the longest from a save's start until its COMPLETE marker, which the deadline
    backstop keeps room for; `held_s`: how long each save held up the loop, waits included).

    An async save's commit is split: the collective part (every rank's write done, files verified)
    in the loop, then rank 0's checksums, COMPLETE and rename in a thread (`mark_complete`), joined
    at the next poll that finds it done, the next save, the stage's end or a stop."""

    rank: int
    keep_last: int
    slowest_s: float = 0.0
    held_s: list[float] = field(default_factory=list)
    _pending: _InFlight | None = None
    _marking: tuple[threading.Thread, _InFlight] | None = None

    @property
    def in_flight(self) -> bool:
        return self._pending is not None or self._marking is not None

    def started(self, handle: SaveHandle, tmp: Path, meta: dict[str, Any], started: float) -> Path | None:
        """Record a save whose files `handle` writes; commits it now when it is synchronous."""
        if self.in_flight:
            raise RuntimeError("a save was started while another one is in flight")
        self._pending = _InFlight(handle, tmp, meta, started, held=time.perf_counter() - started)
        return None if handle.asynchronous else self.finish()

    def poll(self) -> Path | None:
        """At a step boundary (every rank): commit the save in flight if every rank's write is done."""
        if self._marking is not None and not self._marking[0].is_alive():
            self._join_marking()
        if self._pending is None or not self._pending.handle.done(wait=False):
            return None
        return self._commit()

    def finish(self) -> Path | None:
        """Wait for the save in flight (every rank) and its COMPLETE marker; its step-N/ (None: none was)."""
        final = None
        if self._pending is not None:
            t0 = time.perf_counter()
            self._pending.handle.done(wait=True)
            self._pending.held += time.perf_counter() - t0
            final = self._commit()
        self._join_marking()
        return final

    def abandon(self) -> None:
        """After an error: stop the background write; the step stays `.step-N.partial` (never resumed)."""
        if self._marking is not None:  # a commit under way: local file operations, let it end
            try:
                self._join_marking()
            except Exception as exc:  # already failing: report, do not mask the first error
                log.warning("checkpoint commit failed too: %s", exc)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            log.warning("%s: abandoning the save in flight (an error stopped the run)", pending.tmp)
            pending.handle.abandon()

    def _commit(self) -> Path:
        pending, self._pending = self._pending, None
        assert pending is not None
        t0 = time.perf_counter()
        pending.handle.verify()  # a collective: every rank's files are in
        if not pending.handle.asynchronous:
            final = commit_step_dir(pending.tmp, pending.meta, self.rank, self.keep_last)
            pending.held += time.perf_counter() - t0
            self._record(pending, final)
            return final
        pending.held += time.perf_counter() - t0
        if self.rank == 0:
            thread = threading.Thread(target=self._mark, args=(pending,), name="checkpoint-commit")
            thread.start()
            self._marking = (thread, pending)
        else:
            self._record(pending, final_name(pending.tmp))
        return final_name(pending.tmp)

    def _mark(self, pending: _InFlight) -> None:
        try:
            mark_complete(pending.tmp, pending.meta, self.keep_last)
        except BaseException as exc:  # raised in the loop at the join
            pending.error = exc
        pending.done = time.perf_counter()

    def _join_marking(self) -> None:
        if self._marking is None:
            return
        (thread, pending), self._marking = self._marking, None
        t0 = time.perf_counter()
        thread.join()
        pending.held += time.perf_counter() - t0
        if pending.error is not None:
            raise pending.error
        self._record(pending, final_name(pending.tmp))

    def _record(self, pending: _InFlight, final: Path) -> None:
        seconds = (pending.done or time.perf_counter()) - pending.started
        self.slowest_s = max(self.slowest_s, seconds)
        self.held_s.append(pending.held)
        if self.rank == 0:
            log.info("%s: committed %.2f s after the save began (%s; the loop was held %.2f s)", final, seconds,
                     "async" if pending.handle.asynchronous else "sync", pending.held)
