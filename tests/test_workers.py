"""Worker processes: the kernel's first choice when memory runs out, not the coordinator."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import trio_parallel
from helpers.resources import ended

from fl_coordinator import workers
from fl_coordinator.workers import OOM_SCORE_ADJ, worker_processes

SCORE = Path("/proc/self/oom_score_adj")


def score() -> int:
    return int(SCORE.read_text())


async def test_a_worker_is_the_first_to_go_when_memory_runs_out() -> None:
    ours = score()
    async with worker_processes("the test's workers", grace_period=5) as workers:
        in_worker = await workers.run_sync(score)
    assert in_worker == OOM_SCORE_ADJ == 1000
    assert score() == ours < OOM_SCORE_ADJ  # the coordinator itself keeps its own score


async def _killed(workers: trio_parallel.WorkerContext) -> None:
    """One idle worker killed (SIGKILL) and gone: it will not end cleanly at shutdown."""
    pid = await workers.run_sync(os.getpid)
    os.kill(pid, signal.SIGKILL)
    assert await ended(pid)


async def test_a_worker_that_did_not_end_cleanly_is_logged(caplog) -> None:
    caplog.set_level(logging.INFO, "fl_coordinator.workers")
    async with worker_processes("the test's workers", grace_period=5) as workers:
        await _killed(workers)
    # How the worker ended, not trio-parallel's tuple of process reprs.
    assert "the test's workers did not end cleanly at shutdown (exit codes: SIGKILL; " in (
        caplog.text
    )
    assert "ForkServerProcess" not in caplog.text


async def test_a_worker_that_did_not_end_cleanly_does_not_hide_the_bodys_error(caplog) -> None:
    caplog.set_level(logging.INFO, "fl_coordinator.workers")
    with pytest.raises(ValueError, match="the body's own error"):
        async with worker_processes("the test's workers", grace_period=5) as workers:
            await _killed(workers)
            raise ValueError("the body's own error")
    assert "did not end cleanly at shutdown" in caplog.text


async def test_the_bodys_error_keeps_its_cause_and_context_past_an_unclean_shutdown() -> None:
    """The body's error is raised as it was: ``raise ... from`` its cause, and the error
    it was raised while handling, both kept for the traceback. Before, both were replaced
    by the shutdown's BrokenWorkerError, suppressed from the traceback."""
    with pytest.raises(RuntimeError, match="outer") as raised:
        async with worker_processes("the test's workers", grace_period=5) as workers:
            await _killed(workers)
            try:
                raise KeyError("handled")
            except KeyError:
                raise RuntimeError("outer") from ValueError("its cause")
    assert repr(raised.value.__cause__) == "ValueError('its cause')"
    assert repr(raised.value.__context__) == "KeyError('handled')"


async def test_a_broken_worker_error_of_the_body_is_not_taken_for_an_unclean_shutdown(
    caplog,
) -> None:
    caplog.set_level(logging.INFO, "fl_coordinator.workers")
    with pytest.raises(trio_parallel.BrokenWorkerError, match="the body's own"):
        async with worker_processes("the test's workers", grace_period=5) as workers:
            await workers.run_sync(os.getpid)  # a worker, which ends cleanly
            raise trio_parallel.BrokenWorkerError("the body's own")
    assert "did not end cleanly" not in caplog.text


def test_exit_codes_name_signals_and_keep_numbers_python_has_no_name_for() -> None:
    """A worker ended by a real-time signal (40) has no name in Python's ``signal.Signals``:
    before, looking it up raised ValueError inside the shutdown's handler."""

    class Ended:
        def __init__(self, exitcode: int) -> None:
            self.exitcode = exitcode

    error = trio_parallel.BrokenWorkerError("shutdown failed", Ended(255), Ended(-9), Ended(-40))
    assert workers._exit_codes(error) == "exit codes: 255, SIGKILL, signal 40"
