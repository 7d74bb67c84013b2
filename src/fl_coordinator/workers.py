"""Worker processes that can be killed: the checks of selectors' files, the evaluation.

Work that may block for good (a hung mount, a malformed file, a user's
evaluation function) runs in a process, not a thread, because a process can
be killed and a thread cannot. Both kinds of workers come from
``trio-parallel`` worker contexts and are forked from multiprocessing's fork
server: a new worker is ready in milliseconds, and forking the single-threaded
fork server is safe where forking this process, with its threads, is not.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import signal
from collections.abc import AsyncIterator, Callable, Sequence

import trio_parallel

__all__ = ["OOM_SCORE_ADJ", "worker_processes"]

log = logging.getLogger(__name__)

#: Every worker asks the kernel to be the first killed when memory runs out (the
#: most: 1000), so a malformed file or an evaluation that eats memory ends its own
#: worker (seen as that worker's failure), not the coordinator.
OOM_SCORE_ADJ = 1000


def _first_to_go_when_memory_runs_out() -> bool:
    """A worker's start: raise its OOM score (Linux; where it cannot, nothing changes)."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as score:
        score.write(str(OOM_SCORE_ADJ))
    return True


def _signal_name(number: int) -> str:
    """``SIGKILL`` for 9; ``signal 40`` for a number Python has no name for (the real-time
    signals between SIGRTMIN and SIGRTMAX)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exit_codes(error: trio_parallel.BrokenWorkerError) -> str:
    """How the workers of an unclean shutdown ended, in words ("exit codes: 255, SIGKILL"):
    trio-parallel's error carries its processes as they are, whose reprs say too much."""
    codes = [
        _signal_name(-code) if code < 0 else str(code)
        for process in error.args[1:]
        if isinstance(code := getattr(process, "exitcode", None), int)
    ]
    return f"exit codes: {', '.join(codes)}" if codes else str(error.args[0] if error.args else "")


@contextlib.asynccontextmanager
async def worker_processes(
    what: str,
    *,
    grace_period: float,
    idle_timeout: float = math.inf,
    retire: Callable[[], bool] = bool,
    preload: Sequence[str] = (),
) -> AsyncIterator[trio_parallel.WorkerContext]:
    """A worker context for ``what`` (for the log); its workers end when it is left.

    ``preload``: modules the fork server imports once, so that every worker
    starts with them (it is started by the first worker of any context). Like
    every multiprocessing start method but ``fork``, a worker imports the
    program's main module: a program that embeds :func:`fl_coordinator.serve`
    needs the usual ``if __name__ == "__main__":`` guard. Workers that did not
    end cleanly at shutdown are logged, not raised: a signal sent to the whole
    process group (a terminal, a service manager) ends them, or their fork
    server, first; an error of the body is raised all the same (a worker that
    did not end cleanly must not hide why the body ended).
    """
    if preload:
        multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))
    context = trio_parallel.open_worker_context(
        idle_timeout=idle_timeout,
        init=_first_to_go_when_memory_runs_out,
        retire=retire,
        grace_period=grace_period,
        worker_type=trio_parallel.WorkerType.FORKSERVER,
    )
    failed: BaseException | None = None
    try:
        async with context as opened:
            try:
                yield opened
            except BaseException as error:
                failed = error
                raise
    except trio_parallel.BrokenWorkerError as error:
        if error is failed:  # the body's own; the workers ended cleanly
            raise
        log.info(
            "%s did not end cleanly at shutdown (%s; a signal sent to the whole process "
            "group, by a terminal or a service manager, ends them before the coordinator does)",
            what,
            _exit_codes(error),
        )
    if failed is not None:  # raised here, out of the handler: its cause and context kept
        raise failed
