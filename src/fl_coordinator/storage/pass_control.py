"""What an averaging pass's threads and its caller share: stop, publish, and stuck waits.

A selector's folder may live on storage its party serves (NFS, FUSE): a
read of it can block for ever (a hung mount, a server that never answers).
The check of its files runs in a worker process that is killed at
CHECK_TIMEOUT; the averaging runs in threads, which cannot be killed. So
each wait of the pass on an input's storage (an open, a read, an ``fstat``,
a close) is marked with :meth:`PassControl.waiting_on`, and a watchdog
thread (:meth:`PassControl.watched`) tells the caller when one has lasted
longer than the limit: the caller then gives the pass up (its thread is
left to end when the storage answers) and refuses that input.

A pass given up must never publish afterwards: :meth:`PassControl.stop`
and :meth:`PassControl.publishing` decide, under one lock, which of the two
happens (the caller stopped it first, or the pass began to replace the
global checkpoint first, and is then waited for: it only touches the
coordinator's own files from there on).

The files a pass writes (its output, copies of inputs) are emptied as it is
given up (:meth:`PassControl.give_back_space`): their space is not held until
a thread that may never end removes them.

Passes given up, or left by their caller (a shutdown) while their thread
still runs, are remembered until that thread ends (:func:`given_up`).
A thread stuck inside HDF5 holds the library's one lock (h5py serialises
every call of the process): no other pass could open the global checkpoint
until it returns, so a new pass fails at once with a message instead of
blocking where no limit watches (:func:`held_in_hdf5`). And a process must
not run HDF5's exit handler while such a thread holds files open in it: the
handler would close them through Python after Python's end (SIGSEGV); the
command line ends the process without it then (``cli.main.entry``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..errors import ShuttingDown

__all__ = ["PassControl", "Stuck", "given_up", "held_in_hdf5"]

T = TypeVar("T")


def _empty(path: Path) -> None:
    """Truncate ``path`` to nothing, if it is still there (its pass may have removed it)."""
    with contextlib.suppress(OSError):  # else it stays as it was, until its pass removes it
        os.truncate(path, 0)


@dataclass(frozen=True)
class Stuck:
    """A wait of a pass on ``path`` that lasted more than its limit (``since``: when it
    began, ``time.monotonic()``); ``in_hdf5``: inside an HDF5 call (see the module)."""

    path: Path
    since: float
    in_hdf5: bool


#: Passes given up whose thread has not ended yet.
_given_up: set[PassControl] = set()
_given_up_lock = threading.Lock()


def given_up() -> list[PassControl]:
    """The passes given up, or left by a shutdown, whose thread has not ended yet."""
    with _given_up_lock:
        return list(_given_up)


def held_in_hdf5() -> Stuck | None:
    """A wait inside HDF5 that an earlier pass, given up, is still stuck in (or None): any
    of its threads' current waits, not only the one it was given up for."""
    return next((w for c in given_up() for w in c.waits() if w.in_hdf5), None)


class PassControl:
    """Stop, publish and stuck-wait tracking of one averaging pass (see the module).

    The pass checks ``is_set`` between its steps, as it would a ``threading.Event``;
    :meth:`stop` asks it to stop. ``clock``: seconds, monotonic.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._stopped = False
        self._publishing = False
        self._ended = False  # guarded by _given_up_lock
        #: Each thread's current wait on an input's storage: (path, since, in HDF5).
        self._waits: dict[int, tuple[Path, float, bool]] = {}
        #: The wait that made the caller give the pass up, if one did.
        self.stuck: Stuck | None = None
        #: Set as the pass's thread ends (:meth:`ended`).
        self.finished = threading.Event()
        self._scratch: list[Path] = []  # see scratch()
        self._emptied = False
        #: Set once the files of a pass given up are emptied (:meth:`give_back_space`).
        self.space_given_back = threading.Event()

    def is_set(self) -> bool:
        """Whether the pass must stop (checked between its steps)."""
        return self._stopped

    def stop(self) -> bool:
        """Ask the pass to stop; True if it will not publish, False if it already began to."""
        with self._lock:
            if not self._publishing:
                self._stopped = True
            return self._stopped

    def publishing(self) -> None:
        """Called by the pass before it publishes anything; raises ShuttingDown if it was
        stopped (it then leaves every file as it was)."""
        with self._lock:
            if self._stopped:
                raise ShuttingDown("aggregation stopped before it was published")
            self._publishing = True

    def scratch(self, path: Path) -> None:
        """Note ``path``, a file of the coordinator's own that the pass writes (its output,
        a copy of an input, the optimizer's new state), as of no use once the pass is given
        up: it is then emptied (:meth:`give_back_space`), at once if it was given up already.
        The pass itself removes it as it ends."""
        with self._lock:
            self._scratch.append(path)
            emptied = self._emptied
        if emptied:
            _empty(path)

    def give_back_space(self) -> None:
        """Empty the files of a pass that was stopped (:meth:`scratch`).

        Each holds up to a checkpoint's size, reserved before it is written, and
        its thread removes it only as it ends: for a pass given up on a storage
        that never answers, never. So each pass given up in turn (the round goes
        on without that selector) kept another checkpoint's worth of the
        coordinator's disk, until none was left. Blocking I/O on the
        coordinator's own storage: call it in a thread, after the caller was told.
        """
        with self._lock:
            assert self._stopped, "only a stopped pass's files are of no use"
            self._emptied = True
            paths, self._scratch = self._scratch, []
        for path in paths:
            _empty(path)
        self.space_given_back.set()

    @contextlib.contextmanager
    def emptied_is_stopped(self) -> Iterator[None]:
        """Whatever the body (the pass) raises once its files were emptied is ShuttingDown:
        what it met after (a read of its copy or of the optimizer's old moments cut short,
        a changed copy) is of that emptying, not of its inputs or its state, and must not
        be told as theirs."""
        try:
            yield
        except ShuttingDown:
            raise
        except Exception as error:
            with self._lock:
                emptied = self._emptied
            if emptied:
                raise ShuttingDown("aggregation given up: its files were emptied") from error
            raise

    def ended(self) -> None:
        """Called by the pass's thread as it ends, whatever the outcome."""
        with _given_up_lock:
            self._ended = True
            _given_up.discard(self)
        self.finished.set()

    @contextlib.contextmanager
    def waiting_on(self, path: Path, in_hdf5: bool = False) -> Iterator[None]:
        """Mark the calling thread as waiting on ``path``'s storage for the body's length.

        Nested marks are allowed: the inner one is the current wait until it ends; the
        outer one then begins again (the storage answered: a long piece of work made of
        many answered calls, a copy, is not one wait).
        """
        key = threading.get_ident()
        with self._lock:
            outer = self._waits.get(key)
            self._waits[key] = (path, self._clock(), in_hdf5)
        try:
            yield
        finally:
            with self._lock:
                if outer is None:
                    del self._waits[key]
                else:
                    self._waits[key] = (outer[0], self._clock(), outer[2])

    @contextlib.contextmanager
    def closed_waiting(self, path: Path, manager: AbstractContextManager[T]) -> Iterator[T]:
        """``manager``'s value, whose exit (closing an input's HDF5 file) is a wait on
        ``path``'s storage inside HDF5."""
        with contextlib.ExitStack() as inner:
            value = inner.enter_context(manager)
            try:
                yield value
            finally:
                with self.waiting_on(path, in_hdf5=True):
                    inner.close()

    def overdue(self, limit: float) -> Stuck | None:
        """A wait that has lasted more than ``limit`` seconds (the oldest), or None."""
        now = self._clock()
        oldest = self._oldest()
        return oldest if oldest is not None and now - oldest.since > limit else None

    def give_up_if_stuck(self, limit: float) -> bool:
        """Stop the pass if a wait is overdue and it has not begun to publish; True then
        (:attr:`stuck` says which wait). It is remembered until its thread ends
        (:func:`given_up`)."""
        stuck = self.overdue(limit)
        if stuck is None or not self._stop_at(stuck):
            return False
        self._remember()
        return True

    def left(self) -> None:
        """Called by the caller as it stops waiting for the pass, whatever the reason: a
        pass it stopped (cancelled: a shutdown) whose thread still runs is remembered
        like one given up (:func:`given_up`), its oldest wait, if any, as :attr:`stuck`:
        the thread may be inside HDF5, waiting on a selector's storage, with no limit
        watching it any more."""
        if self._stop_at(self._oldest()):
            self._remember()

    def waits(self) -> list[Stuck]:
        """The waits under way (one per thread at most), the oldest first."""
        with self._lock:
            waits = sorted(self._waits.values(), key=lambda wait: wait[1])
        return [Stuck(*wait) for wait in waits]

    def _oldest(self) -> Stuck | None:
        """The wait that began first, of those under way, or None."""
        return next(iter(self.waits()), None)

    def _stop_at(self, stuck: Stuck | None) -> bool:
        """:meth:`stop`, with :attr:`stuck` set first (if it was not): the pass's thread
        and the caller see a stop only once they can see why."""
        with self._lock:
            if not self._publishing:
                if self.stuck is None:
                    self.stuck = stuck
                self._stopped = True
            return self._stopped

    def _remember(self) -> None:
        """Remember this pass (:func:`given_up`) unless its thread has ended."""
        with _given_up_lock:
            if not self._ended:
                _given_up.add(self)

    @contextlib.contextmanager
    def watched(self, limit: float, on_stuck: Callable[[], None]) -> Iterator[None]:
        """While the body runs, a thread checks every ``limit / 4`` seconds (at most 1 s)
        whether a wait is overdue; if so it gives the pass up and calls ``on_stuck()``
        (from that thread), once. Real time, whatever clock the caller's loop uses."""
        done = threading.Event()
        period = min(1.0, limit / 4)

        def watch() -> None:
            while not done.wait(period):
                if self.give_up_if_stuck(limit):
                    on_stuck()
                    self.give_back_space()
                    return

        watcher = threading.Thread(target=watch, name="averaging watchdog", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
