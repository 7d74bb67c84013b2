"""One budget for the bytes gRPC peers have sent and no call has read yet, all connections together.

A peer may send, within its HTTP/2 flow-control window, the first part of a
message and never the rest. Those bytes wait in memory for the rest (a gRPC
message is parsed whole); so do the frames of a header block that is never
finished. Each connection's window is two messages (8 MiB by default), so
without a bound across connections 1,000 of them could park 8 GiB.

Windows stay as they are (a selector's message is never slowed by flow
control); instead each connection keeps an :class:`Account` of what it holds
unread, and when the total passes the budget, connections are shed (GOAWAY)
until it fits: first the one whose data has waited longest since it last
received any, the one that triggered the overflow last. Why not "the one
holding most": an attacker spreading its bytes thinly over many connections
would make an honest sender of one large message the largest holder. Data
that is being sent now is an honest upload's; data parked for a while is not.

Memory freed when a connection ends goes back to the allocator in 16 KiB
pieces (one per DATA frame), which glibc keeps in its heap: ``malloc_trim``
gives it back to the system, at most every :data:`TRIM_INTERVAL` seconds,
after at least :data:`TRIM_BYTES` were released.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

import trio

from ..log_throttle import Throttle

__all__ = ["TRIM_BYTES", "TRIM_INTERVAL", "Account", "ReadBudget"]

log = logging.getLogger(__name__)

#: Released bytes worth giving back to the system.
TRIM_BYTES = 1 << 20
#: Least time between two ``malloc_trim`` calls (seconds).
TRIM_INTERVAL = 0.5


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


_TRIM = _malloc_trim()


class Account:
    """What one connection holds unread (bytes), and since when it received none.

    ``shed`` is called (once, from :meth:`ReadBudget.fit`) to close the
    connection; from then on the account counts nothing.
    """

    __slots__ = ("_budget", "data_at", "held", "open", "shed")

    def __init__(self, budget: ReadBudget, shed: Callable[[], None]) -> None:
        self._budget = budget
        self.shed = shed
        self.held = 0
        self.data_at = trio.current_time()
        self.open = True

    def add(self, nbytes: int, *, data: bool = False) -> None:
        """``nbytes`` more held (negative: read or dropped); ``data``: bytes just arrived."""
        if not self.open:
            return
        self.held += nbytes
        self._budget.total += nbytes
        if data:
            self.data_at = trio.current_time()

    def close(self) -> None:
        """The connection ended or was shed: what it held is released."""
        if not self.open:
            return
        self.open = False
        self._budget.close(self)


class ReadBudget:
    """At most ``limit`` bytes held unread across the accounts it opened."""

    def __init__(self, limit: int, throttle: Throttle) -> None:
        self.limit = limit
        self.total = 0
        self._accounts: set[Account] = set()
        self._throttle = throttle
        self._released = 0
        self._trim_at = -float("inf")
        self._trim_scheduled = False

    def open(self, shed: Callable[[], None]) -> Account:
        account = Account(self, shed)
        self._accounts.add(account)
        return account

    def close(self, account: Account) -> None:
        self._accounts.discard(account)
        self.total -= account.held
        self._release(account.held)
        account.held = 0

    def fit(self, newest: Account) -> None:
        """Shed connections until the total fits: the most stalled first, ``newest`` last."""
        if self.total <= self.limit:
            return
        others = sorted(
            (a for a in self._accounts if a.held > 0 and a is not newest),
            key=lambda a: a.data_at,
        )
        for account in [*others, newest]:
            if self.total <= self.limit:
                break
            self._throttle.warning(
                "closed a gRPC connection for holding unread data over the budget",
                "%d bytes of half-sent gRPC requests held, over GRPC_MAX_BUFFERED_BYTES=%d; "
                "closed the connection holding %d of them, idle for %.1f s",
                self.total,
                self.limit,
                account.held,
                trio.current_time() - account.data_at,
            )
            account.shed()
            account.close()

    def _release(self, nbytes: int) -> None:
        """Give freed memory back to the system once enough of it was released."""
        self._released += nbytes
        if _TRIM is None or self._released < TRIM_BYTES or self._trim_scheduled:
            return
        self._trim_scheduled = True
        trio.lowlevel.spawn_system_task(self._trim)

    async def _trim(self) -> None:
        # After the buffers are dropped (the connection's task finishes first), and
        # not more often than every TRIM_INTERVAL: a trim walks the whole heap.
        await trio.sleep_until(max(trio.current_time(), self._trim_at + TRIM_INTERVAL))
        self._trim_scheduled = False
        self._released = 0
        self._trim_at = trio.current_time()
        assert _TRIM is not None
        _TRIM()
