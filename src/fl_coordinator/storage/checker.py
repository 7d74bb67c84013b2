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
  growing; HDF5 plugin filters are never loaded in a worker. What a check
  freed, glibc mostly keeps in the process, and the next check's limit would
  start from there: a worker that grew by :data:`RETIRE_GROWTH` is replaced,
  and its job stops at the file after which it did (the files left are
  checked in a new worker), so every file gets the budget, no more;
* waits for one of ``CHECK_WORKERS`` slots (first come, first served), so
  any number of selectors never makes more processes, and a slow check holds
  one slot for at most the deadline; the aggregation uses none of them;
* shares its job with the checks that queued up while every slot was busy
  (a *batch*): one job costs one inter-process round trip (about 8 ms on a
  busy machine) where the check of a small file itself costs under 2 ms.
  What waits when several slots are free is shared among them, to run side
  by side. Batches are bounded (:data:`BATCH_MAX` files, :data:`BATCH_BYTES` of
  checkpoint), and a batch that fails as a whole (its worker crashed or was
  killed by the kernel, it did not finish in time) is split: each of its
  files is checked again in a job of its own, so a hostile file still
  rejects only its own selector. ``CHECK_TIMEOUT`` keeps its meaning per
  file: a file is abandoned only when its check *alone* does not finish
  within it. A batch gets :data:`BATCH_SECONDS` (or CHECK_TIMEOUT if less):
  the others that shared a hostile file's job wait that long, not a whole
  CHECK_TIMEOUT (60 s, often longer than what is left of the reporting
  window, which would have dropped them all);
* checks against the global checkpoint's plan that the coordinator read at
  start-up (:class:`.contribution.CheckpointSpec`): a check never opens the
  global checkpoint, so a problem with that file (another process holding it
  locked) is never blamed on a selector;
* is tried again when the coordinator is out of its own resources, and then
  blames nobody: a worker out of descriptors (EMFILE, ENFILE, when the worker itself
  can open no file either: :class:`.untrusted.OwnShortage`; a selector's own file
  system may answer EMFILE too, and is then rejected, as for any other errno it
  answers: EIO, ESTALE, ...),
  or the coordinator unable to start or talk to a worker (any OSError on its
  side: no descriptor for a pipe, no process for a fork). Such a check is
  tried again after :data:`RETRY_FIRST_SECONDS`, doubling up to
  :data:`RETRY_MAX_SECONDS`, for up to ``CHECK_TIMEOUT``; if it still cannot
  run, :class:`~fl_coordinator.errors.OutOfResources` says what ran out, and
  the round (not the selector) fails. Memory is the exception: a worker's
  limit is set *for the file* (above), so a MemoryError or ENOMEM inside a
  check is the file's doing, and rejects it.

Whatever goes wrong, the answer is a reason (which file, what was wrong),
escaped and cut to a few hundred characters by :func:`.untrusted.clip`.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import math
import os
import resource
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import trio
import trio_parallel

from ..errors import ContributionError, OutOfResources, os_error_text
from ..log_throttle import Throttle
from ..workers import worker_processes
from .aggregation import Contribution
from .contribution import CheckpointSpec, NotSettled, SelectorFiles, examine
from .layout import Layout
from .untrusted import OURS, OwnShortage, clip, raise_if_own_shortage

__all__ = [
    "BATCH_BYTES",
    "BATCH_MAX",
    "BATCH_SECONDS",
    "GRACE_SECONDS",
    "IDLE_SECONDS",
    "MEMORY_BUDGET",
    "RETIRE_GROWTH",
    "RETRY_FIRST_SECONDS",
    "RETRY_MAX_SECONDS",
    "ContributionChecker",
]

log = logging.getLogger(__name__)

#: Memory a check may use above what its worker process already uses. A check
#: holds one slab (8 MiB), one chunk (CHUNK_MAX_BYTES) being read and one in the
#: chunk cache, and HDF5's metadata cache (at most 32 MiB by default); the rest is
#: slack for the allocator.
MEMORY_BUDGET = 256 * 2**20

#: A worker whose address space grew by more than this since its first job is
#: replaced, after the check that grew it (a slab and a chunk kept by the
#: allocator stay below it). A check that took memory up to MEMORY_BUDGET left a
#: worker 220 MiB larger, and the next file's limit 220 MiB higher (measured).
RETIRE_GROWTH = 64 * 2**20

#: Idle workers are ended after this long (a round lasts minutes).
IDLE_SECONDS = 600.0

#: How long the worker processes get to end when the coordinator stops.
GRACE_SECONDS = 2.0

#: Most files checked in one job. It bounds what a batch that fails as a whole
#: costs: each of its files checked again alone.
BATCH_MAX = 32

#: Most checkpoint bytes (the global checkpoint's size per file) checked in one
#: job. Batching pays where the inter-process round trip (milliseconds) is a
#: large part of a check; a batch of larger files would only add to what the
#: last of them waits, and could not end within one file's deadline.
BATCH_BYTES = 64 * 2**20


#: Deadline of a job of several files (one file's is CHECK_TIMEOUT): what the
#: others of a batch wait when one of its files hangs, before each is checked
#: alone. A batch's checks take well under a second (at most BATCH_BYTES of
#: plain arrays); one that is only slow (a loaded machine) is checked again
#: alone, which costs time, never a rejection.
BATCH_SECONDS = 5.0

#: A check that could not run for want of the coordinator's own resources is tried again
#: after this long, then after twice as long each time, up to RETRY_MAX_SECONDS, until
#: CHECK_TIMEOUT has passed since its first try: descriptors are usually freed in
#: moments (connections closing, an aggregation ending), and a round lasts minutes.
RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 5.0


def _statm(field: int) -> int:
    """Field ``field`` of /proc/self/statm (0: address space, 1: resident), in bytes;
    OwnShortage if the process is out of descriptors (or memory) to read it."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[field]) * os.sysconf("SC_PAGE_SIZE")
    except OSError as error:
        raise_if_own_shortage(error)
        raise


@functools.cache
def _baseline() -> int:
    """In a worker: its address space at its first job (taken once per process)."""
    return _statm(0)


def _grown() -> bool:
    """In a worker: whether it grew by RETIRE_GROWTH (after each file, and after each job:
    trio-parallel's hook, which then replaces it, and must not raise). A worker that cannot
    read its size (out of descriptors) is kept: a new one would need descriptors too."""
    try:
        return _statm(0) > _baseline() + RETIRE_GROWTH
    except OSError:
        return False


def _examine_within(
    budget: int, selector: str, files: SelectorFiles, spec: CheckpointSpec, settle: bool
) -> Contribution:
    """In a worker process: :func:`examine` under an address-space limit of now + ``budget``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _statm(0) + budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        return examine(selector, files, spec, settle)
    except (MemoryError, OSError) as error:
        if isinstance(error, OSError) and error.errno != errno.ENOMEM:
            raise
        folder = files.root / selector
        raise ContributionError(
            f"{folder}: checking these files needed more than {budget // 2**20} MiB of memory"
        ) from None
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@dataclass(frozen=True)
class _Crashed:
    """A check that raised what no file should make it raise (a bug): its traceback, as text."""

    error: str
    traceback: str


@dataclass(frozen=True)
class _Ours:
    """A check that could not run for want of the coordinator's own resources: why
    (:func:`~fl_coordinator.errors.os_error_text`). Tried again; never a rejection."""

    error: str


_Outcome = Contribution | str | NotSettled | _Crashed | _Ours


def _ours_or_the_files(error: OSError, folder: Path) -> _Ours | str:
    """An OSError out of a check: the worker's own shortage only if it says so itself
    (:class:`.untrusted.OwnShortage`: an open that failed and confirmed it, or one of
    the worker's own files), else the selector's rejection: any other errno (EIO,
    EACCES, ESTALE, ... and EMFILE too) is what the selector's file system (FUSE,
    network), which may answer anything, said to a read of its files."""
    if isinstance(error, OwnShortage):
        return _Ours(os_error_text(error))
    short = "; the check was not short of any" if error.errno in OURS else ""
    return clip(f"{folder}: these files cannot be read ({os_error_text(error)}, said their "
                f"file system{short}): not the coordinator's fault; check the storage that "
                "serves this folder")  # fmt: skip


def _examine_each(
    budget: int, checks: Sequence[tuple[str, bool]], files: SelectorFiles, spec: CheckpointSpec
) -> list[_Outcome]:
    """In a worker process: each ``(selector, settle)`` of ``checks`` examined, in order,
    up to the first after which the worker had grown (see RETIRE_GROWTH): the outcomes
    of a prefix of ``checks``, at least one.

    Each file gets its own memory limit, and what one file does to its check
    (a malformed file's error, NotSettled, a bug) is that file's outcome
    only; only what ends the job as a whole (the process dies, the deadline)
    is the batch's.
    """
    _baseline()
    while h5py.h5pl.size():  # no filter plugin is ever loaded from the library's search path
        h5py.h5pl.remove(0)
    outcomes: list[_Outcome] = []
    for selector, settle in checks:
        try:
            outcomes.append(_examine_within(budget, selector, files, spec, settle))
        except NotSettled as fresh:
            outcomes.append(fresh)
        except ContributionError as error:
            outcomes.append(clip(str(error)))
        except OSError as error:
            outcomes.append(_ours_or_the_files(error, files.root / selector))
        except Exception as error:
            outcomes.append(_Crashed(f"{type(error).__name__}: {error}", traceback.format_exc()))
        if _grown():
            break
    return outcomes


def _ready() -> None:
    """A new worker's first job: unpickling it imports this module; the worker's size then
    is what it may grow from."""
    _baseline()


@dataclass(eq=False)
class _Request:
    """One selector's check, from :meth:`ContributionChecker.check` to the job that ran it."""

    selector: str
    settle: bool
    outcome: _Outcome | None = None
    done: trio.Event = field(default_factory=trio.Event)
    waited: bool = True  # False once its caller stopped waiting (cancelled)
    job: _Job | None = None


@dataclass(eq=False)
class _Job:
    """Requests checked in one worker job; cancelled (its worker killed) when none is waited."""

    requests: list[_Request]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


_TRIED_AGAIN = (
    "the check of %s's files cannot run: the coordinator is out of its own resources (%s); "
    "tried again for up to %.3g s"
)


class ContributionChecker:
    """Checks selectors' files in worker processes. Use :meth:`running`, then :meth:`check`.

    ``spec`` is what every aggregate is checked against; ``timeout`` (seconds)
    is the deadline of one file's check, ``workers`` the number of jobs (and
    processes) at most at once.
    """

    def __init__(self, layout: Layout, spec: CheckpointSpec, timeout: float, workers: int) -> None:
        self._layout = layout
        self._spec = spec
        self._files = SelectorFiles(layout.root, layout.agg_checkpoint_name, layout.agg_weight_name)
        self._timeout = timeout
        self._workers = workers
        self._slots = trio.Semaphore(workers)
        self._unlimited = trio.CapacityLimiter(math.inf)  # ours is taken before the deadline
        self._context: trio_parallel.WorkerContext | None = None
        self._batch_max = max(1, min(BATCH_MAX, BATCH_BYTES // max(1, spec.file_bytes)))
        self._queue: collections.deque[_Request] = collections.deque()
        self._alone: collections.deque[_Request] = collections.deque()  # from failed batches
        self._arrived = trio.Event()
        # While the coordinator is short of descriptors, every report's check says so:
        # the first line of each cause a minute is written, the others counted.
        self._repeats = Throttle(log)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The worker processes live inside (``workers`` of them, started before it yields).

        Workers are forked from multiprocessing's fork server, which imports
        this module (numpy, h5py) once: a new worker, at start or after one was
        killed, is ready in milliseconds instead of half a second (see
        :mod:`..workers`).
        """
        try:
            async with (
                worker_processes(
                    "check worker processes",
                    idle_timeout=IDLE_SECONDS,
                    retire=_grown,
                    grace_period=GRACE_SECONDS,
                    preload=[__name__],
                ) as self._context,
                trio.open_nursery() as jobs,
            ):
                jobs.start_soon(self._dispatch, jobs)
                jobs.start_soon(self._repeats.run)
                await self.warm()  # ready to serve is ready to check
                yield
                jobs.cancel_scope.cancel()
        finally:
            self._context = None

    async def warm(self) -> None:
        """Start the workers that are not there and idle: at start, and when a round configures.

        A worker takes a few milliseconds to fork, but its first job imports
        the program's main module again (multiprocessing does so), which takes
        what that module takes; started here, it is not on a report's path.
        """
        assert self._context is not None, "use warm() inside running()"
        missing = self._workers - self._context.statistics().idle_workers
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
                except (trio_parallel.BrokenWorkerError, OSError) as error:
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

        A check that cannot run for want of the coordinator's own resources
        is tried again (RETRY_FIRST_SECONDS, doubling) until CHECK_TIMEOUT has
        passed; then OutOfResources, which blames nobody.
        """
        deadline = trio.current_time() + self._timeout
        delay, settle = RETRY_FIRST_SECONDS, False
        while True:
            outcome = await self._checked(selector, settle)
            if isinstance(outcome, NotSettled):
                assert not settle, "a settling check waits in its worker"
                settle = True
                await trio.sleep(outcome.wait)
                continue
            if not isinstance(outcome, _Ours):
                break
            left = deadline - trio.current_time()
            if left <= 0:
                raise OutOfResources(self._out_of_resources(selector, outcome))
            said = (_TRIED_AGAIN, selector, outcome.error, left)
            if delay == RETRY_FIRST_SECONDS:  # once per check, at most a line a minute
                self._repeats.warning(f"checks tried again ({outcome.error})", *said, peer="")
            else:
                log.debug(*said)
            await trio.sleep(min(delay, left))
            delay = min(2 * delay, RETRY_MAX_SECONDS)
        if isinstance(outcome, _Crashed):
            folder = self._layout.selector_dir(selector)
            log.error("checking %s crashed:\n%s", folder, outcome.traceback)
            return clip(f"{folder}: internal error: {outcome.error}")
        return outcome

    def _out_of_resources(self, selector: str, ours: _Ours) -> str:
        folder = self._layout.selector_dir(selector)
        return (
            f"{folder}: these files could not be checked: the coordinator ran out of its own "
            f"resources ({ours.error}) and still had none after trying again for "
            f"{self._timeout:g} s (CHECK_TIMEOUT); not the selector's fault: raise the "
            "coordinator's RLIMIT_NOFILE (ulimit -n) or memory, or lower CHECK_WORKERS"
        )

    async def _checked(self, selector: str, settle: bool) -> _Outcome:
        """Queue ``selector``'s check for the next job; its outcome once that job ran."""
        assert self._context is not None, "use check() inside running()"
        request = _Request(selector, settle)
        self._queue.append(request)
        self._arrived.set()
        try:
            await request.done.wait()
        finally:
            if not request.done.is_set():  # cancelled: its job goes on only for the others
                request.waited = False
                job = request.job
                if job is not None and not any(other.waited for other in job.requests):
                    job.scope.cancel()
        assert request.outcome is not None
        return request.outcome

    async def _dispatch(self, jobs: trio.Nursery) -> None:
        """Start a job whenever checks wait and a slot is free: those that waited, together."""
        while True:
            if not (self._queue or self._alone):
                self._arrived = trio.Event()
                await self._arrived.wait()
                continue
            await self._slots.acquire()
            batch = self._next_batch()
            if batch:
                jobs.start_soon(self._job, batch)
            else:
                self._slots.release()  # every request that waited was abandoned

    def _next_batch(self) -> list[_Request]:
        """A file of a failed batch, alone; else the head of the queue, in order: its share
        among the slots free now (this one and the others), within the batch's bounds.

        Shared, because a batch is checked in order by one worker: 10 files
        queued with both slots free took twice as long in one job as in two.
        """
        while self._alone:
            request = self._alone.popleft()
            if request.waited:
                return [request]
        share = math.ceil(len(self._queue) / (1 + self._slots.value))
        batch: list[_Request] = []
        while self._queue and len(batch) < min(share, self._batch_max):
            request = self._queue.popleft()
            if request.waited:
                batch.append(request)
        return batch

    async def _job(self, batch: list[_Request]) -> None:
        """Check ``batch`` in one worker job (holding the slot taken for it), then answer each
        request, or, if the job failed as a whole, queue each file to be checked alone."""
        job = _Job(batch)
        for request in batch:
            request.job = job
        if not any(request.waited for request in batch):  # abandoned since it was taken
            job.scope.cancel()
        outcomes: list[_Outcome] | _Ours | str | None = None
        try:
            with job.scope:
                deadline = self._timeout if len(batch) == 1 else min(self._timeout, BATCH_SECONDS)
                job.scope.deadline = trio.current_time() + deadline
                outcomes = await self._run(batch)
        finally:
            self._slots.release()
        if isinstance(outcomes, _Ours):  # the job could not run: each is tried again
            for request in batch:
                self._answer(request, outcomes)
        elif isinstance(outcomes, list):  # of a prefix: the worker grew, the rest in another
            for request, outcome in zip(batch[: len(outcomes)], outcomes, strict=True):
                self._answer(request, outcome)
            self._again(batch[len(outcomes) :], alone=False)
        elif len(batch) == 1:
            (request,) = batch
            folder = self._layout.selector_dir(request.selector)
            self._answer(request, clip(f"{folder}: {outcomes}") if outcomes else (
                f"{folder}: the check of these files did not finish within {self._timeout:g} s "
                "(CHECK_TIMEOUT); abandoned"
            ))  # fmt: skip
        else:
            log.info("a check of %d selectors' files failed as a whole (%s); each is checked "
                     "again alone", len(batch), outcomes or "deadline")  # fmt: skip
            self._again(batch, alone=True)

    def _again(self, requests: list[_Request], *, alone: bool) -> None:
        """Queue ``requests`` for later jobs: each alone (from a batch that failed as a
        whole), or else at the head of the queue, in order."""
        for request in requests:
            request.job = None
        if alone:
            self._alone.extend(requests)
        else:
            self._queue.extendleft(reversed(requests))
        self._arrived.set()

    @staticmethod
    def _answer(request: _Request, outcome: _Outcome) -> None:
        request.outcome = outcome
        request.done.set()

    async def _run(self, batch: Sequence[_Request]) -> list[_Outcome] | _Ours | str:
        """Each outcome of ``batch``, or why the job failed as a whole: _Ours if the
        coordinator could not start or talk to a worker (an OSError on its side: no
        descriptor for a pipe, no process), else for a person."""
        assert self._context is not None, "use check() inside running()"
        checks = [(request.selector, request.settle) for request in batch]
        try:
            return await self._context.run_sync(
                _examine_each, MEMORY_BUDGET, checks, self._files, self._spec,
                kill_on_cancel=True, limiter=self._unlimited,
            )  # fmt: skip
        except trio_parallel.BrokenWorkerError as error:
            code = getattr(error.args[-1], "exitcode", None)
            return f"checking these files ended its worker process (exit {code})"
        except OSError as error:
            return _Ours(os_error_text(error))
        except Exception as error:
            log.exception("a job checking %d selectors' files crashed", len(batch))
            return f"internal error: {type(error).__name__}: {error}"
