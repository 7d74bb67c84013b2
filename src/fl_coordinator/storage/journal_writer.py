"""The one writer of the round journal: off the event loop, in order, never fatal.

The round task hands it an entry at each stage change (:meth:`JournalWriter.submit`,
which never waits). Each entry is the whole state, so only the latest
matters: entries that arrive while one is being written replace each other
instead of queueing.

A write that fails (a full disk, the root remounted read-only, a lost mount)
must not end the coordinator: the failure is logged once, :attr:`failure`
says what is wrong (the health check answers NOT_SERVING meanwhile), and the
write is tried again with back-off until it works; the recovery is logged
too. :meth:`settled` is the write-ahead rule of the aggregation: the global
checkpoint is only replaced once the journal says the round is aggregating,
so a restart can always tell whether a new checkpoint belongs to a round.
On shutdown (cancellation, SIGTERM, Ctrl-C) the latest entry is still
written, within DRAIN_SECONDS, so the journal is never behind the status
stream after a graceful stop.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..errors import os_error_text
from .journal import Entry, journal_path, write_journal
from .layout import Layout

__all__ = ["DRAIN_SECONDS", "RETRY_FIRST", "RETRY_MAX", "JournalWriter", "write_when_woken"]

log = logging.getLogger(__name__)

#: Back-off between attempts while writes fail, in seconds.
RETRY_FIRST = 0.5
RETRY_MAX = 5.0
#: How long a stopping coordinator waits for the last entry to be written.
DRAIN_SECONDS = 5.0


async def write_when_woken(
    woken: Callable[[], Awaitable[None]],
    write: Callable[[], Awaitable[None]],
    drain: Callable[[], Awaitable[None]],
) -> None:
    """``write()`` each time ``woken()`` returns, until cancelled; then ``drain()``, shielded,
    for at most :data:`DRAIN_SECONDS`: what is not on disk at shutdown gets one bounded try.

    The loop of the coordinator's background writers (the journal, the round log).
    """
    try:
        while True:
            await woken()
            await write()
    finally:
        with trio.CancelScope(deadline=trio.current_time() + DRAIN_SECONDS, shield=True):
            await drain()


class JournalWriter:
    """Writes the latest submitted :class:`~.journal.Entry`; run :meth:`run` in a nursery."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._pending: Entry | None = None
        self._attempts = 0
        self._work = trio.Event()  # an entry to write, or a retry wanted now
        self._progress = trio.Event()  # set (and replaced) after every attempt
        #: Why the last write failed, until one succeeds again (None: all is well).
        self.failure: str | None = None

    def submit(self, entry: Entry) -> None:
        """Write ``entry`` next (it replaces any entry not written yet). Never waits."""
        self._pending = entry
        self._work.set()

    async def settled(self) -> str | None:
        """Wait until every submitted entry is on disk: None, or why the last attempt failed.

        While writes are failing it asks for one more attempt at once (not
        after the back-off) and answers with that attempt's outcome.
        """
        while self._pending is not None:
            attempts = self._attempts
            self._work.set()
            while self._attempts == attempts:
                await self._progress.wait()
            if self._pending is not None and self.failure is not None:
                return self.failure
        return None

    async def run(self) -> None:
        """Write entries as they come until cancelled; then write the latest one."""
        await write_when_woken(self._woken, self._write_pending, self._drain)

    async def _woken(self) -> None:
        await self._work.wait()
        self._work = trio.Event()

    async def _drain(self) -> None:
        if self._pending is not None:
            await self._attempt(self._pending, abandon_on_cancel=True)

    async def _write_pending(self) -> None:
        delay = RETRY_FIRST
        while (entry := self._pending) is not None:
            if await self._attempt(entry):
                delay = RETRY_FIRST
                continue
            with trio.move_on_after(delay):
                await self._work.wait()  # a newer entry, or settled() wants an attempt now
            self._work = trio.Event()
            delay = min(2 * delay, RETRY_MAX)

    async def _attempt(self, entry: Entry, abandon_on_cancel: bool = False) -> bool:
        # Not abandoned on cancellation (except when draining against a deadline):
        # two writes of the journal in flight could land out of order.
        try:
            await trio.to_thread.run_sync(
                write_journal, self._layout, entry, abandon_on_cancel=abandon_on_cancel
            )
        except OSError as error:
            failure = f"cannot write the round journal {journal_path(self._layout)}: " + (
                os_error_text(error)
            )
            if self.failure is None:
                log.error(
                    "%s; the coordinator goes on and tries again (health: NOT_SERVING)", failure
                )
            self.failure = failure
            written = False
        else:
            if self._pending is entry:
                self._pending = None
            if self.failure is not None:
                log.warning("the round journal %s is written again", journal_path(self._layout))
            self.failure = None
            written = True
        self._attempts += 1
        self._progress.set()
        self._progress = trio.Event()
        return written
