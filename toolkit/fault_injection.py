"""Test hooks that place a fault at an exact step of a real run. Both read the environment and are
no-ops when it is unset (every run outside the tests).

- EMBEDFORGE_TEST_FAIL_AT="RANK:STAGE:STEP" (or "RANK:STAGE:end"): that rank raises there, as a bug or a
  bad record on one rank would, while its peers go on into a collective (failure propagation must end
  the job within seconds).
- EMBEDFORGE_TEST_HOLD_AT="RANK:STAGE:STEP": that rank waits after that step (its checkpoint committed,
  when saves are synchronous) until a stop is requested or it is killed, at most HOLD_LIMIT_S. A tiny
  test run finishes a step in ~40 ms, so a signal sent "after the step-2 checkpoint" by another process
  could land after the whole run has ended (seen in CI); held, the signal always lands mid-run, as it
  does in a real hours-long run.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

log = logging.getLogger(__name__)
TEST_FAIL_ENV = "EMBEDFORGE_TEST_FAIL_AT"
TEST_HOLD_ENV = "EMBEDFORGE_TEST_HOLD_AT"
HOLD_LIMIT_S = 120.0


def injected_failure(rank: int, stage: str, where: str) -> None:
    """Raise if EMBEDFORGE_TEST_FAIL_AT names this rank, stage and step (or "end")."""
    wanted = os.environ.get(TEST_FAIL_ENV)
    if wanted and wanted == f"{rank}:{stage}:{where}":
        raise RuntimeError(f"{TEST_FAIL_ENV}={wanted}: injected failure on rank {rank}, stage {stage}, at {where}")


def hold_until_stopped(rank: int, stage: str, step: int, stop_requested: Callable[[], bool]) -> None:
    """Wait here if EMBEDFORGE_TEST_HOLD_AT names this rank, stage and step, until `stop_requested()`
    (a signal handler ran) or the limit passes; the peers wait in their next collective meanwhile."""
    wanted = os.environ.get(TEST_HOLD_ENV)
    if not wanted or wanted != f"{rank}:{stage}:{step}":
        return
    log.warning("%s=%s: holding rank %d after step %d until a stop is requested", TEST_HOLD_ENV, wanted, rank, step)
    end = time.monotonic() + HOLD_LIMIT_S
    while not stop_requested() and time.monotonic() < end:
        time.sleep(0.01)  # a signal handler runs between these sleeps
    if not stop_requested():
        log.warning("%s=%s: no stop requested within %.0f s; going on", TEST_HOLD_ENV, wanted, HOLD_LIMIT_S)
