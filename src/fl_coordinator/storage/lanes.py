"""Independent pieces of one job, run side by side on a few threads ("lanes").

The averaging pass computes each weight array on its own: its slabs are
read with ``preadv``, added and stepped by numpy and written with ``pwrite``,
and all of these release the GIL. On this 2-core machine, two lanes each
taking the next array in turn finished the pass in 0.7 (96 MB x 8) to 0.8
(1 GB x 2) of the time of one. The result is the same bits whatever the
lanes: an array's arithmetic does not depend on which lane runs it.

A failure in one lane stops the others at their next check (:class:`Halt`)
and is raised once all have stopped, so no lane is still writing when the
caller cleans up; refusals of inputs found by several lanes are merged (every
refused selector at once, not one per retry). The lanes are daemon threads,
not an executor's: a lane stuck on a selector's storage, given up by the
caller (see :mod:`.pass_control`), must not hold up the process's exit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

from ..errors import ContributionsRefused, ShuttingDown
from .pass_control import PassControl

__all__ = ["LANES", "Halt", "in_lanes"]

T = TypeVar("T")
R = TypeVar("R")

#: Lanes of the averaging pass: one per core this process may run on, at most two (the
#: pass is bounded by memory bandwidth beyond that, and the event loop needs a core too).
LANES = min(2, len(os.sched_getaffinity(0)))


class Halt:
    """Whether a lane must stop: the caller's ``cancel`` was set, or another lane failed.

    Quacks like the ``threading.Event`` the pass checks between slabs, and marks the
    lane's waits on an input's storage for the caller's ``cancel`` (see
    :mod:`.pass_control`).
    """

    def __init__(self, cancel: PassControl | None) -> None:
        self._cancel = PassControl() if cancel is None else cancel
        self._failed = threading.Event()
        self._lock = threading.Lock()
        self.errors: list[BaseException] = []

    def is_set(self) -> bool:
        return self._failed.is_set() or self._cancel.is_set()

    def waiting_on(self, path: Path, in_hdf5: bool = False) -> AbstractContextManager[None]:
        """See :meth:`.PassControl.waiting_on`."""
        return self._cancel.waiting_on(path, in_hdf5)

    def fail(self, error: BaseException, caused_by_halt: bool) -> None:
        """Record a lane's error; one caused only by this halt is recorded only if no other."""
        with self._lock:
            if not caused_by_halt or not self.errors:
                self.errors.append(error)
            self._failed.set()

    def raise_first(self) -> None:
        """Raise what stopped the lanes: merged refusals if every error was one, else the first."""
        with self._lock:
            errors = list(self.errors)
        if not errors:
            return
        if all(isinstance(error, ContributionsRefused) for error in errors):
            reasons: dict[str, str] = {}
            for error in errors:
                reasons.update(error.reasons)  # type: ignore[attr-defined]
            raise ContributionsRefused(reasons)
        raise errors[0]


def in_lanes(
    items: Sequence[T],
    work: Callable[[T, R, Halt], int],
    contexts: Sequence[R],
    cancel: PassControl | None,
) -> int:
    """The sum of ``work(item, context, halt)`` over ``items``, in ``len(contexts)`` lanes.

    Each lane (at most one per item) owns one of ``contexts`` (what may not be
    shared between threads, such as a pool of descriptors) and takes the next
    item until none is left; the caller's thread is the first lane. ``work``
    checks ``halt.is_set()`` between its steps and stops (raising) when it is set.
    """
    halt = Halt(cancel)
    remaining: Iterator[T] = iter(items)
    lock = threading.Lock()
    totals: list[int] = []  # what each lane's work summed to, appended as it ends

    def lane(context: R) -> None:
        count = 0
        try:
            while True:
                with lock:
                    try:
                        item = next(remaining)
                    except StopIteration:
                        return
                count += work(item, context, halt)
        except BaseException as error:
            halt.fail(error, caused_by_halt=isinstance(error, ShuttingDown) and halt.is_set())
        finally:
            totals.append(count)

    contexts = contexts[: max(1, len(items))]  # no thread started for nothing to do
    others = [
        threading.Thread(target=lane, args=(context,), name="average", daemon=True)
        for context in contexts[1:]
    ]
    for other in others:
        other.start()
    lane(contexts[0])
    for other in others:
        other.join()
    halt.raise_first()
    return sum(totals)
