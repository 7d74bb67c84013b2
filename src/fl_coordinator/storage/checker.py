"""Checking selectors' files in worker processes: bounded in time, memory and number.

A selector reports; before its files may be averaged, :func:`.contribution.examine`
reads them. That is parsing untrusted HDF5, and it runs in a worker
**process**, not a thread, because a thread cannot be stopped: an HDF5 call
that blocks (a file on a hung mount, a malformed file that sends the library
into a loop) would hold its thread, and h5py's global lock, for good, and
with them every later check, the aggregation and the health probe. A
process can be killed. So each check here

* runs in a worker process of a pool (``trio-parallel``; workers are
  started with the coordinator and kept for the next check, so a check
  costs a round trip of a few milliseconds, not a process start),
  with a deadline (``CHECK_TIMEOUT``): a check that does not finish in time
  is killed with its process, and the selector is rejected;
* has a memory limit: the worker lowers its own address-space limit
  (``RLIMIT_AS``) to what it uses plus :data:`MEMORY_BUDGET` for the check, so
  whatever a file claims, the check fails with a MemoryError instead of
  growing; HDF5 plugin filters are never loaded in a worker;
* waits for one of ``CHECK_WORKERS`` slots (first come, first served), so
  any number of selectors never makes more processes, and a slow check holds
  one slot for at most the deadline; the aggregation uses none of them;
* checks against the global checkpoint's plan that the coordinator read at
  start-up (:class:`.contribution.CheckpointSpec`): a check never opens the
  global checkpoint, so a problem with that file (another process holding it
  locked) is never blamed on a selector.

Whatever goes wrong, the answer is a reason (which file, what was wrong),
escaped and cut to a few hundred characters by :func:`.untrusted.clip`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import h5py
import trio
import trio_parallel

from ..errors import ContributionError
from ..workers import worker_processes
from .aggregation import Contribution
from .contribution import CheckpointSpec, NotSettled, SelectorFiles, examine
from .layout import Layout
from .untrusted import clip

__all__ = ["GRACE_SECONDS", "IDLE_SECONDS", "MEMORY_BUDGET", "RETIRE_RSS", "ContributionChecker"]

log = logging.getLogger(__name__)

#: Memory a check may use above what its worker process already uses. A check
#: holds one slab (8 MiB), one chunk (CHUNK_MAX_BYTES) and HDF5's metadata cache
#: (at most 32 MiB by default); the rest is slack for the allocator.
MEMORY_BUDGET = 256 * 2**20

#: A worker whose resident memory grew past this after a check is replaced.
RETIRE_RSS = 512 * 2**20

#: Idle workers are ended after this long (a round lasts minutes).
IDLE_SECONDS = 600.0

#: How long the worker processes get to end when the coordinator stops.
GRACE_SECONDS = 2.0


def _statm(field: int) -> int:
    """Field ``field`` of /proc/self/statm (0: address space, 1: resident), in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[field]) * os.sysconf("SC_PAGE_SIZE")


def _grown() -> bool:
    """In a worker, after each check: retire it if its memory grew (trio-parallel's hook)."""
    return _statm(1) > RETIRE_RSS


def _examine_within(
    budget: int, selector: str, files: SelectorFiles, spec: CheckpointSpec, settle: bool
) -> Contribution:
    """In a worker process: :func:`examine` under an address-space limit of now + ``budget``."""
    while h5py.h5pl.size():  # no filter plugin is ever loaded from the library's search path
        h5py.h5pl.remove(0)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _statm(0) + budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        return examine(selector, files, spec, settle)
    except MemoryError:
        folder = files.root / selector
        raise ContributionError(
            f"{folder}: checking these files needed more than {budget // 2**20} MiB of memory"
        ) from None
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _ready() -> None:
    """A job that does nothing: unpickling it makes a new worker import this module."""


class ContributionChecker:
    """Checks selectors' files in worker processes. Use :meth:`running`, then :meth:`check`.

    ``spec`` is what every aggregate is checked against; ``timeout`` (seconds)
    is the deadline of one check, ``workers`` the number of checks (and
    processes) at most at once.
    """

    def __init__(self, layout: Layout, spec: CheckpointSpec, timeout: float, workers: int) -> None:
        self._layout = layout
        self._spec = spec
        self._files = SelectorFiles(layout.root, layout.agg_checkpoint_name, layout.agg_weight_name)
        self._timeout = timeout
        self._slots = trio.CapacityLimiter(workers)
        self._unlimited = trio.CapacityLimiter(math.inf)  # ours is taken before the deadline
        self._context: trio_parallel.WorkerContext | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The worker processes live inside (``workers`` of them, started before it yields).

        Workers are forked from multiprocessing's fork server, which imports
        this module (numpy, h5py) once: a new worker, at start or after one was
        killed, is ready in milliseconds instead of half a second (see
        :mod:`..workers`).
        """
        try:
            async with worker_processes(
                "check worker processes",
                idle_timeout=IDLE_SECONDS,
                retire=_grown,
                grace_period=GRACE_SECONDS,
                preload=[__name__],
            ) as self._context:
                await self.warm()  # ready to serve is ready to check
                yield
        finally:
            self._context = None

    async def warm(self) -> None:
        """Start the workers that are not there and idle: at start, and when a round configures.

        A worker takes a few milliseconds to fork, but its first job imports
        the program's main module again (multiprocessing does so), which takes
        what that module takes; started here, it is not on a report's path.
        """
        assert self._context is not None, "use warm() inside running()"
        missing = int(self._slots.total_tokens) - self._context.statistics().idle_workers
        async with trio.open_nursery() as nursery:
            for _ in range(missing):
                nursery.start_soon(self._start_worker)

    async def _start_worker(self) -> None:
        assert self._context is not None
        async with self._slots:
            with trio.move_on_after(self._timeout):
                try:
                    await self._context.run_sync(_ready, kill_on_cancel=True,
                                                 limiter=self._unlimited)  # fmt: skip
                except trio_parallel.BrokenWorkerError as error:
                    log.error("a worker process to check selectors' files failed to start (%s)",
                              error)  # fmt: skip

    async def check(self, selector: str) -> Contribution | str:
        """The contribution of ``selector`` if its files can be averaged, else why not.

        A checkpoint changed less than SETTLE_SECONDS ago (its identity would
        not show a rewrite in the same clock tick) is not read: its check
        returns at once and is run again once the file has settled, the wait
        spent here, where it holds no worker; the second time, the worker
        waits if it must. A file written well before its report (the common
        case) costs no wait at all.
        """
        folder = self._layout.selector_dir(selector)
        for settle in (False, True):
            outcome: Contribution | str | NotSettled | None = None
            async with self._slots:
                with trio.move_on_after(self._timeout):
                    outcome = await self._run(selector, self._spec, folder, settle)
            if not isinstance(outcome, NotSettled):
                break
            await trio.sleep(outcome.wait)
        if outcome is None:
            return (
                f"{folder}: the check of these files did not finish within {self._timeout:g} s "
                "(CHECK_TIMEOUT); abandoned"
            )
        assert not isinstance(outcome, NotSettled), "a settling check waits in its worker"
        return outcome

    async def _run(
        self, selector: str, spec: CheckpointSpec, folder: Path, settle: bool
    ) -> Contribution | str | NotSettled:
        assert self._context is not None, "use check() inside running()"
        try:
            return await self._context.run_sync(
                _examine_within, MEMORY_BUDGET, selector, self._files, spec, settle,
                kill_on_cancel=True, limiter=self._unlimited,
            )  # fmt: skip
        except NotSettled as fresh:
            return fresh
        except ContributionError as error:
            return clip(str(error))
        except trio_parallel.BrokenWorkerError as error:
            code = getattr(error.args[-1], "exitcode", None)
            return clip(f"{folder}: checking these files ended its worker process (exit {code})")
        except Exception as error:
            log.exception("checking %s crashed", folder)
            return clip(f"{folder}: internal error: {type(error).__name__}: {error}")
