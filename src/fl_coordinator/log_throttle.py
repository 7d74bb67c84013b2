"""Log lines a peer can cause at will: the first of a kind, then a count per interval.

A peer decides how often it makes us write "refused", "handshake failed" or
"connection limit reached": once per connection, or 30,000 times a second.
Lines like these go through a :class:`Throttle`: the first line of a kind
from a peer is written as it is; the repeats within the next
:data:`INTERVAL` seconds are only counted, and their count is written once
the interval is over (``"... and 29999 more from 10.0.0.7 in the last 60 s:
TLS handshake failed"``). The log then grows with time, not with what peers
send.

A peer is its host (connections from one host come from ever new ports).
The table of (kind, peer) is bounded: when full, further peers share one
entry. Each server owns its throttles and runs :meth:`Throttle.run` in its
nursery, which writes the counts of intervals that ended; the last counts
are written when it is cancelled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import trio

from .logs import context_field

__all__ = ["INTERVAL", "MAX_ENTRIES", "Throttle"]

#: Seconds between two lines of the same kind from the same peer.
INTERVAL = 60.0

#: (kind, peer) pairs remembered at once; beyond, new peers share one entry.
MAX_ENTRIES = 256

_OTHER_PEERS = "other peers"


@dataclass
class _Window:
    until: float
    level: int
    held: int = 0  # lines counted, not written


def _host(peer: str) -> str:
    """``"10.0.0.7"`` of ``"10.0.0.7:51234"`` (the port changes with every connection)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


class Throttle:
    """Writes to ``logger`` at most one line per (kind, peer) per ``interval`` seconds."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = INTERVAL,
        *,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self.interval = interval
        self._max_entries = max_entries
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}

    def log(
        self,
        level: int,
        kind: str,
        message: str,
        *args: Any,
        peer: str | None = None,
        exc_info: bool = False,
    ) -> None:
        """Write ``message % args`` unless a line of ``kind`` from ``peer`` was written lately.

        ``kind`` is a short description of the line ("TLS handshake failed"),
        used in the count. ``peer`` defaults to the ``peer`` of the log context
        (set for the task serving a connection); "" is the server itself.
        """
        if peer is None:
            peer = context_field("peer") or ""
        key = (kind, _host(peer))
        now = self._clock()
        window = self._windows.get(key)
        if window is None and len(self._windows) >= self._max_entries:
            self.flush()
            if len(self._windows) >= self._max_entries:
                key = (kind, _OTHER_PEERS)
                window = self._windows.get(key)
        if window is not None and now < window.until:
            window.held += 1
            return
        if window is not None:
            self._write_count(key, window)
        self._windows[key] = _Window(until=now + self.interval, level=level)
        self._logger.log(level, message, *args, exc_info=exc_info)

    def warning(self, kind: str, message: str, *args: Any, peer: str | None = None) -> None:
        self.log(logging.WARNING, kind, message, *args, peer=peer)

    def flush(self, *, everything: bool = False) -> None:
        """Write the counts of the intervals that ended (of all of them with ``everything``)."""
        now = self._clock()
        for key, window in list(self._windows.items()):
            if everything or now >= window.until:
                del self._windows[key]
                self._write_count(key, window)

    def _write_count(self, key: tuple[str, str], window: _Window) -> None:
        if not window.held:
            return
        kind, host = key
        source = f" from {host}" if host else ""
        self._logger.log(
            window.level,
            "... and %d more%s in the last %.0f s: %s",
            window.held,
            source,
            self.interval,
            kind,
        )

    async def run(self) -> NoReturn:
        """Write the counts as their intervals end, until cancelled (then write the rest)."""
        try:
            while True:
                await trio.sleep(self.interval)
                self.flush()
        finally:
            self.flush(everything=True)
