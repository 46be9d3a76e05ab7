"""The megatron engine's async save: megatron-core's own, behind the trainer's `SaveHandle`.

`dist_checkpointing.save(..., async_sharded_save=True)` plans the save and returns an AsyncRequest;
megatron's `AsyncCallsQueue` stages the tensors (GPU: a copy to CPU memory; CPU: the forked writer's
copy-on-write snapshot) and forks a process that writes them while the loop goes on. Its finalize
(a collective: gather the write results, raise on every rank if one failed, write `.metadata` and
metadata.json) runs when every rank's writer has exited; then every rank checks that the files it
staged are on disk with at least their bytes, and only then may the trainer write COMPLETE.

The writer forks one worker per write bucket (megatron's `write_preloaded_data_multiproc`), so it
leads a process group of its own, and the writer, its workers and nothing else end together: on
`abandon()` (a kill of the group: killing the writer alone orphaned a worker blocked forever on the
writer's queue, holding the job's stdout open) and when the trainer dies (PR_SET_PDEATHSIG sends the
writer SIGTERM, whose handler kills the group). A kill -9 leaves no orphan that could still be
writing when a restarted run reuses the same `.step-N.partial`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from toolkit.checkpoint.pending import SaveHandle
from toolkit.errors import CheckpointError

log = logging.getLogger(__name__)
# Test hook only (tests/test_async_save.py): the writer process sleeps this many seconds after writing,
# so a test can kill the trainer while a save is in flight. Unset outside tests: no delay.
TEST_SLOW_ENV = "EMBEDFORGE_TEST_SLOW_SAVE"
_PR_SET_PDEATHSIG = 1


def _end_group(*_) -> None:
    os.killpg(0, signal.SIGKILL)  # this writer's group: the writer and its workers


def _writer(write, *args, **kwargs) -> None:
    """The forked writer: lead its own group, end it with the trainer, write, (in tests) linger."""
    os.setpgid(0, 0)  # also done by the trainer right after the fork (whichever runs first)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer's handlers were inherited by the fork
    signal.signal(signal.SIGTERM, _end_group)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: an orphan only finishes its bounded write
        pass
    if os.getppid() == 1:  # the trainer died before the death signal was armed
        _end_group()
    write(*args, **kwargs)
    time.sleep(float(os.environ.get(TEST_SLOW_ENV, "0") or 0))


def _own_group(pid: int) -> None:
    """Put the forked writer in a group of its own from the trainer's side too, so the group exists
    before `abandon()` can kill it (setpgid from both sides: no race with the writer's first line)."""
    try:
        os.setpgid(pid, pid)
    except (ProcessLookupError, PermissionError):  # already gone, or it did it itself
        pass


def _staged_files(request) -> list[tuple[Path, int]]:
    """(file, tensor bytes it must hold at least) for each file this rank's writer writes."""
    if request.async_fn is None:
        return []
    buckets = request.async_fn_args[1]  # megatron's write buckets: (path, name, (bytes items, tensor items))
    return [(Path(path), sum(t.numel() * t.element_size() for _, t in tensors)) for path, _, (_, tensors) in buckets]


class MegatronAsyncSave(SaveHandle):
    asynchronous = True

    def __init__(self, request, target: Path):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.target = target
        self.files = _staged_files(request)
        if request.async_fn is not None:
            request = request._replace(async_fn=partial(_writer, request.async_fn))
        self.queue = AsyncCallsQueue(persistent=False)
        self.queue.schedule_async_request(request)  # every rank: stages, then forks its writer
        for pid in self._writer_pids():
            _own_group(pid)

    def _writer_pids(self) -> list[int]:
        return [call.async_caller.process.pid for call in self.queue.async_calls
                if getattr(call.async_caller, "process", None) is not None]

    def done(self, *, wait: bool) -> bool:
        """megatron's check (an all-reduce of "still writing"), and its finalize once all are done."""
        if not self.queue.get_num_unfinalized_calls():
            return True
        return bool(self.queue.maybe_finalize_async_calls(blocking=wait))

    def verify(self) -> None:
        """Every rank's staged files exist with at least their tensor bytes, and the finalize wrote
        megatron's metadata; all ranks agree (one failure fails the commit everywhere)."""
        problems = [f"{path}: missing or short ({path.stat().st_size if path.exists() else 0} bytes, "
                    f"{need} staged)" for path, need in self.files if not path.is_file() or path.stat().st_size < need]
        if not dist.is_initialized() or dist.get_rank() == 0:
            problems += [f"{self.target / name}: missing" for name in (".metadata", "metadata.json", "common.pt")
                         if not (self.target / name).is_file()]
        flag = torch.tensor([len(problems)], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if problems:
            raise CheckpointError(f"async save into {self.target}: {problems[0]}; the step is not marked complete")
        if int(flag.item()):
            raise CheckpointError(f"async save into {self.target}: another rank's files are incomplete; "
                                  "the step is not marked complete")

    def abandon(self) -> None:
        for pid in self._writer_pids():
            try:
                os.killpg(pid, signal.SIGKILL)  # the writer and its workers; nothing is finalized
            except ProcessLookupError:
                pass
        for call in list(self.queue.async_calls):
            call.async_caller.close(abort=True)  # reaps the writer (a kill of what is already dead)
        self.queue.async_calls.clear()
