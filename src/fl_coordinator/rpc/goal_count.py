"""``GoalCountReached`` to selectors over kept connections, a bounded number at a time.

The round task calls a :class:`GoalCountClient` (handed to it by the
composition root) concurrently for every selector of a round, with retries,
so one unreachable selector cannot stop the others from being told.

Why connections are kept: dialing costs a TCP (and TLS) handshake and an
HTTP/2 preface per selector per round, most of the round's overhead with
fake selectors that answer at once (``scripts/bench --parts round``). So
one channel per selector is kept open while the selector takes part in
rounds (:meth:`GoalCountClient.retain` closes the others), at most
``max_open`` of them: the least recently used idle one is closed to make
room, and at most ``max_open`` calls are in flight, so a broadcast to
2,000 selectors holds ``max_open`` descriptors, not 2,000.

A purerpc channel runs a task group, which must be entered and left by one
task: each kept channel is held by a task of its own (a *link*) in the
client's nursery (:meth:`GoalCountClient.run`); calls use its stub from the
caller's task. Without :meth:`run` the client dials once per call.
"""

from __future__ import annotations

import logging
import resource
import ssl
from collections.abc import Callable, Collection

import h2.exceptions
import trio

from .._proto import fl_intra_grpc, fl_intra_pb2
from ..connections import descriptor_budget
from .addresses import BoundedChannel, call_once, dial

__all__ = ["DEFAULT_MAX_OPEN", "GoalCountClient", "outgoing_budget"]

log = logging.getLogger(__name__)

#: Kept connections when the descriptor limit does not say otherwise (see :func:`outgoing_budget`).
DEFAULT_MAX_OPEN = 256


def outgoing_budget(limit: int | None = None) -> int:
    """Outgoing connections this process may keep: half of what :func:`.descriptor_budget`
    keeps out of the listeners' budget, between 4 and :data:`DEFAULT_MAX_OPEN`.

    ``limit`` defaults to the soft ``RLIMIT_NOFILE``: 1,024 gives 128.
    """
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            limit = 1 << 20
    reserved = limit - descriptor_budget(limit)
    return max(4, min(DEFAULT_MAX_OPEN, reserved // 2))


class _Link:
    """One kept channel to one selector, held open by :meth:`hold` (a task of its own)."""

    __slots__ = ("_calls", "busy", "channel", "ready", "scope", "selector", "stub")

    def __init__(self, selector: str) -> None:
        self.selector = selector
        self.scope = trio.CancelScope()  # cancelled: the channel is closed
        self.ready = trio.Event()  # set once dialed, or once dialing failed
        self.busy = 1  # calls in flight or waiting for the dial (the first: its dialer)
        self._calls: set[trio.CancelScope] = set()  # those calls, ended with the channel
        self.channel: BoundedChannel | None = None
        self.stub: fl_intra_grpc.FLGoalCountBroadcastStub | None = None

    async def hold(
        self,
        ssl_context: ssl.SSLContext | None,
        slots: trio.Semaphore,
        ended: Callable[[_Link], None],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Dial (errors go to the caller of ``nursery.start``), then keep the channel open
        until :attr:`scope` is cancelled or the connection ends (its peer closed it or sent
        GOAWAY, or it failed: logged, not raised); then, its slot given back, end the calls
        on it and tell ``ended``."""
        started = False
        try:
            with self.scope:
                async with slots, dial(self.selector, ssl_context) as channel:
                    self.channel = channel
                    self.stub = fl_intra_grpc.FLGoalCountBroadcastStub(channel)
                    task_status.started()
                    started = True
                    await channel.wait_ended()
                    log.debug("connection to %s ended (closed, broken or GOAWAY)", self.selector)
            if not started:  # closed by retain() while it was being dialed
                raise ConnectionError(f"connection to {self.selector} closed while dialing")
        except Exception as error:
            if not started:
                raise
            log.debug("connection to %s ended: %r", self.selector, error)
        except BaseExceptionGroup as group:  # the channel's tasks: an error and a cancellation
            cancelled = group.subgroup(trio.Cancelled)
            if not started or cancelled is group:
                raise
            # A grpcio server shutting down sends GOAWAY and a PING, which purerpc's h2
            # refuses (see .addresses.call_once): only the cancellation goes on.
            log.debug("connection to %s ended: %r", self.selector, group)
            if cancelled is not None:
                raise cancelled from None
        finally:
            self.stub = None
            for call in self._calls:  # a call on a closed channel would wait forever
                call.cancel()
            ended(self)

    def closed(self) -> bool:
        """The channel is gone, or can take no call (see :meth:`.BoundedChannel.takes_calls`)."""
        if not self.ready.is_set():
            return False  # being dialed: wait for it
        if self.stub is None or self.scope.cancel_called:
            return True
        return self.channel is None or not self.channel.takes_calls()

    async def call(self) -> None:
        """``GoalCountReached`` on this channel; ConnectionError if it closes meanwhile,
        purerpc's RpcFailedError if the selector answers an error (or resets the call).
        Cancelled (its time is up), the call is cancelled at the selector too
        (:meth:`.BoundedChannel.calls_cancelled_on_exit`): the channel is kept.

        The caller counted itself in :attr:`busy` (see :meth:`GoalCountClient._link`).
        """
        await self.ready.wait()
        stub, channel = self.stub, self.channel
        if stub is None or channel is None:
            raise ConnectionError(f"connection to {self.selector} failed")
        with trio.CancelScope() as scope, channel.calls_cancelled_on_exit():
            self._calls.add(scope)
            try:
                await _goal_count_reached(stub)
                return
            except h2.exceptions.ProtocolError as error:  # h2 closed as the call began
                raise ConnectionError(f"connection to {self.selector} failed: {error}") from error
            finally:
                self._calls.discard(scope)
        raise ConnectionError(f"connection to {self.selector} closed during the call")


async def _goal_count_reached(stub: fl_intra_grpc.FLGoalCountBroadcastStub) -> None:
    await stub.GoalCountReached(fl_intra_pb2.Empty())


class GoalCountClient:
    """Tells one selector at a time to configure its clients.

    Each call has its own time limit, ``call_timeout`` seconds, which does
    not count the wait for one of the ``max_open`` slots (default:
    :func:`outgoing_budget`); with ``ssl_context`` it goes over TLS (see
    :func:`.addresses.dial`). Connections are kept only while :meth:`run`
    runs.
    """

    def __init__(
        self,
        call_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        *,
        max_open: int | None = None,
    ) -> None:
        self.call_timeout = call_timeout
        self.max_open = outgoing_budget() if max_open is None else max_open
        self._ssl_context = ssl_context
        self._calls = trio.CapacityLimiter(self.max_open)  # calls in flight
        self._slots = trio.Semaphore(self.max_open)  # open channels
        self._links: dict[str, _Link] = {}  # by selector, least recently used first
        self._nursery: trio.Nursery | None = None

    @property
    def open(self) -> int:
        """Channels open now (kept or being dialed)."""
        return self.max_open - self._slots.value

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep connections until cancelled; then close them all."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._links.clear()

    def retain(self, selectors: Collection[str]) -> None:
        """Close the kept channels of selectors not in ``selectors`` (a round's)."""
        keep = set(selectors)
        for selector in [s for s in self._links if s not in keep]:
            self._links.pop(selector).scope.cancel()

    async def __call__(self, selector_id: str) -> None:
        """``GoalCountReached`` to ``selector_id``; TimeoutError if it does not answer in time."""
        async with self._calls:
            if self._nursery is None:  # not running: a connection of its own per call
                await call_once(
                    selector_id,
                    lambda channel: _goal_count_reached(
                        fl_intra_grpc.FLGoalCountBroadcastStub(channel)
                    ),
                    seconds=self.call_timeout,
                    ssl_context=self._ssl_context,
                )
                return
            try:
                with trio.fail_after(self.call_timeout):
                    link = await self._link(selector_id, self._nursery)
                    try:
                        await link.call()
                    finally:
                        link.busy -= 1
            except trio.TooSlowError:
                raise TimeoutError(f"no answer within {self.call_timeout:g} s") from None

    async def _link(self, selector: str, nursery: trio.Nursery) -> _Link:
        """The kept channel to ``selector`` (dialed if there is none, or it was closed),
        with the caller counted in its ``busy``."""
        link = self._links.pop(selector, None)
        if link is not None and link.closed():
            link.scope.cancel()
            link = None
        if link is not None:
            link.busy += 1
            self._links[selector] = link  # now the most recently used
            return link
        if len(self._links) >= self.max_open:  # kept, or being dialed: every slot promised
            self._evict_idle()
        link = self._links[selector] = _Link(selector)
        try:
            await nursery.start(link.hold, self._ssl_context, self._slots, self._forget)
        except BaseException:  # hold forgot it as it ended, unless it never ran
            self._forget(link)
            raise
        finally:
            link.ready.set()
        return link

    def _forget(self, link: _Link) -> None:
        """``link``'s channel ended (a failed connection, or closed): it no longer counts."""
        if self._links.get(link.selector) is link:
            del self._links[link.selector]

    def _evict_idle(self) -> None:
        """Close the least recently used channel that has no call in flight.

        There is one while a call waits here: at most ``max_open`` calls are in
        flight, this one included, so at most ``max_open - 1`` channels are busy.
        """
        for selector, link in self._links.items():
            if not link.busy:
                del self._links[selector]
                link.scope.cancel()
                return
