"""Coalescing client check-ins (and releases) into batched calls to the coordinator.

With one ``ClientCountUpdate`` per client, admitting clients is bound by the
cost of one gRPC call each (on a 2-core machine, about a thousand a second).
A selector that sees clients arrive faster than that does not need to ask
for each one: the clients that arrive while a call is in flight wait for the
next call, which asks for all of them at once (``CheckInClients``). A lone
client still gets its answer after one call, so batching costs no latency
when the load is low, and the batch grows with the load by itself. Clients
the selector lets go in one round are given back the same way
(``ReleaseClients``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

__all__ = ["Batcher", "Grant"]

#: ``(granted, round)``: how many of the clients asked about were granted (kept by the
#: round, or released), and the coordinator's number of the round that answered (0: none).
Grant = tuple[int, int]


class _Waiter:
    """One client waiting for its answer: granted or not, or the error of its batch."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.granted = False
        self.round = 0
        self.error: Exception | None = None
        self.gone = False  # its client stopped waiting (cancelled)


class Batcher:
    """``await ask()`` per client; at most one call to the coordinator in flight.

    ``ask_many(n)`` asks about ``n`` clients at once and returns a
    :data:`Grant`; the first ones waiting are granted (first come, first
    served, as on the coordinator). The calls run in ``nursery``, not in a
    client's task, so a client that hangs up cannot strand the others in its
    batch. A client that stopped waiting (its connection closed) may still be
    granted by the call it was part of: ``abandoned(round)`` is then called
    once for it, so that the selector can give it back.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        ask_many: Callable[[int], Awaitable[Grant]],
        abandoned: Callable[[int], None] | None = None,
    ) -> None:
        self._nursery = nursery
        self._ask_many = ask_many
        self._abandoned = abandoned
        self._waiting: list[_Waiter] = []
        self._calling = False

    async def ask(self) -> tuple[bool, int]:
        """Is this client granted, and in which round? Raises the error of its batch's call."""
        waiter = _Waiter()
        self._waiting.append(waiter)
        if not self._calling:
            self._calling = True
            self._nursery.start_soon(self._drain)
        try:
            await waiter.done.wait()
        except trio.Cancelled:
            waiter.gone = True
            raise
        if waiter.error is not None:
            raise waiter.error
        return waiter.granted, waiter.round

    async def _drain(self) -> None:
        try:
            while self._waiting:
                # Clients that left before their call are not asked about.
                batch = [waiter for waiter in self._waiting if not waiter.gone]
                self._waiting = []
                if not batch:
                    continue
                try:
                    granted, number = await self._ask_many(len(batch))
                except Exception as error:
                    for waiter in batch:
                        waiter.error = error
                else:
                    for waiter in batch[:granted]:
                        waiter.granted, waiter.round = True, number
                        if waiter.gone and self._abandoned is not None:
                            self._abandoned(number)
                finally:
                    for waiter in batch:
                        waiter.done.set()
        finally:
            self._calling = False
