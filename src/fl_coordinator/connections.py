"""Admission of connections on every listener: a cap, a descriptor budget, shedding.

A peer may open, stall or abandon any number of connections, and each one
holds a file descriptor, a task and buffers. Every listener of the
coordinator (gRPC, status websocket, metrics) accepts through a
:class:`Gate`:

* at most ``max_connections`` are open on the listener: ``MAX_CONNECTIONS``,
  lowered by the server to its listener's share of :func:`descriptor_budget`
  (``RLIMIT_NOFILE`` less a quarter kept for the checkpoint and aggregate
  files, ``GoalCountReached`` calls and worker threads), so that peers
  holding every connection they may cannot make an aggregation fail for want
  of a descriptor, nor fill one port to lock out another. A listener that can
  *make room* (gRPC) closes its least recently active connection for a new
  one, preferring one without calls in flight (:meth:`Slot.set_busy`): the
  Go selector opens a connection per call and never closes it, and a gRPC
  client whose connection is closed (with an HTTP/2 GOAWAY, after its calls
  in flight finish) simply dials again. The other listeners close, to make
  room, the oldest connection still in its handshake (:meth:`Slot.settle`
  marks the end of one): otherwise peers that start handshakes and never
  finish them, each replaced as soon as ``handshake_timeout`` closes it,
  would keep the webserver and the scraper out for as long as they like. A
  status subscriber is never idle by choice: when every connection has
  finished its handshake, the new one is closed at once;
* a connection closed to make room still holds its descriptor while it
  says goodbye (a GOAWAY, its calls in flight finishing: up to a second):
  at most :data:`CLOSING_MAX` of them per listener (fewer under a small
  ``RLIMIT_NOFILE``: see :func:`port_share`), all its sockets together
  (``localhost``: IPv4 and IPv6). With that many closing, the listener
  hurries one (cuts its goodbye short, :attr:`Slot.hurry`: the oldest
  without calls in flight, else the oldest) and accepts the next connection
  only when one has gone; otherwise a peer that dials faster than its
  connections take their goodbyes would hold descriptors beyond the port's
  share.
  :func:`port_share` counts them in the share;
* if ``accept`` fails for want of descriptors anyway (EMFILE, ENFILE: other
  code opened files meanwhile), the listener does not stop (before, the
  process exited): it closes a descriptor it keeps in reserve, accepts one
  waiting connection with it and closes it at once, so peers are told at
  once instead of waiting in the backlog (the libev remedy), and it serves
  again as soon as descriptors are free.

Refusals are logged through a :class:`~.log_throttle.Throttle`: one line
per interval with a count, whatever the rate of connections.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import resource
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Generic, NamedTuple, NoReturn, TypeVar

import anyio
import trio

from .log_throttle import Throttle

__all__ = [
    "CAPACITY_ERRNOS",
    "CLOSING_MAX",
    "IGNORED_ERRNOS",
    "MIN_RESERVED_DESCRIPTORS",
    "ConnectionLimits",
    "Gate",
    "PortShare",
    "S",
    "Slot",
    "descriptor_budget",
    "port_share",
    "serve_listeners",
]

log = logging.getLogger(__name__)

S = TypeVar("S")

#: ``accept`` errors that mean "no descriptor or buffer left": shed and go on.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: ``accept`` errors about one connection that died while queued (as trio ignores them).
_IGNORED_NAMES = "ECONNABORTED EPROTO EPERM ENETDOWN ENOPROTOOPT EHOSTDOWN ENONET EHOSTUNREACH"
IGNORED_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (*_IGNORED_NAMES.split(), "EOPNOTSUPP", "ENETUNREACH")
    if hasattr(errno, name)
)

#: Descriptors always kept out of the connections' budget (see :func:`descriptor_budget`).
MIN_RESERVED_DESCRIPTORS = 32
#: Connections of one listener closed to make room that may still be saying goodbye.
CLOSING_MAX = 8
#: Back-off between ``accept`` attempts while no descriptor can be had at all.
MIN_BACKOFF, MAX_BACKOFF = 0.01, 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    """What one listener's peers may cost (``MAX_CONNECTIONS``, ``*_TIMEOUT`` keys).

    ``max_closing``: connections closed to make room that may still be saying
    goodbye (:data:`CLOSING_MAX`, or fewer: see :func:`port_share`);
    ``idle_timeout`` (seconds, None: never) applies where a connection has
    calls to be idle between (gRPC); ``handshake_timeout`` (seconds) bounds a
    TLS handshake on every port, the websocket upgrade and a metrics request.
    """

    max_connections: int = 1000
    max_closing: int = CLOSING_MAX
    idle_timeout: float | None = None
    handshake_timeout: float = 5.0


def descriptor_budget(limit: int | None = None) -> int:
    """Descriptors the connections of this process may hold, all ports together.

    ``limit`` (default: the soft ``RLIMIT_NOFILE``) less a quarter, and at
    least :data:`MIN_RESERVED_DESCRIPTORS`, kept for everything else (stdio,
    the event loop, files, outgoing calls): 192 of 256, 768 of 1,024.
    """
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            limit = 1 << 20
    return max(1, limit - max(MIN_RESERVED_DESCRIPTORS, limit // 4))


class PortShare(NamedTuple):
    """One listener's part of :func:`descriptor_budget`, as :class:`ConnectionLimits` counts it."""

    #: Connections it may keep open (its ``max_connections``), at least 1.
    connections: int
    #: Connections closed to make room that may still be saying goodbye (its ``max_closing``).
    closing: int


def port_share(ports: int, limit: int | None = None) -> PortShare:
    """What one of ``ports`` listeners may hold of :func:`descriptor_budget`.

    Its part, less the connections closing (:data:`CLOSING_MAX`, but no more
    than an eighth of the part, and at least 1: under a small limit, the
    closing ones must not take the open ones' places) and its spare
    descriptor (kept for ``accept`` failing with EMFILE). 256 descriptors,
    two ports: 87 open and 8 closing each; 64, three ports: 8 and 1.
    """
    part = descriptor_budget(limit) // ports
    closing = max(1, min(CLOSING_MAX, part // 8))
    return PortShare(max(1, part - closing - 1), closing)


class Slot:
    """One admitted connection: its place in its gate's recency order, and how to close it."""

    __slots__ = ("_busy_until", "_gate", "busy", "cancel_scope", "evict", "hurry", "settled")

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        #: The connection finished its handshake (see :meth:`settle`).
        self.settled = False
        #: The connection has calls in flight (see :meth:`set_busy`).
        self.busy = False
        self._busy_until = -math.inf  # (see busy_for)
        #: Cancels the connection's handler (what :attr:`evict` does unless replaced).
        self.cancel_scope = trio.CancelScope()
        #: Called (synchronously) to close the connection to make room for a new one;
        #: a handler may replace it to say goodbye first (gRPC: GOAWAY).
        self.evict: Callable[[], None] = self.cancel_scope.cancel
        #: Called (synchronously) to cut short the goodbye of a connection closed to make
        #: room, when the gate has as many closing as it keeps; a handler may replace it
        #: to say its last word first, without waiting for its peer (gRPC: which calls
        #: never started, so that the peer sends them again).
        self.hurry: Callable[[], None] = self.cancel_scope.cancel

    def touch(self) -> None:
        """The connection was active: it is the last one to close to make room."""
        self._gate._touch(self)

    def set_busy(self, busy: bool) -> None:
        """The connection has calls in flight (True) or none (False): a gate that makes
        room closes one without while there is any, and hurries one without first.

        Either way it keeps its place in the recency order: only :meth:`touch` moves
        it (becoming quiet is no activity: a peer could otherwise make its connection
        the last one to close by opening and resetting requests).
        """
        self.busy = busy

    def busy_for(self, seconds: float) -> None:
        """The connection counts as having a call in flight for ``seconds`` from now (0: no
        longer), besides :attr:`busy` (gRPC: a request whose bytes are arriving; one that
        stops arriving for that long no longer protects its connection: it costs its
        peer nothing)."""
        self._busy_until = trio.current_time() + seconds

    def in_flight(self, now: float) -> bool:
        """Whether the connection has a call in flight at ``now`` (trio's clock)."""
        return self.busy or now < self._busy_until

    def settle(self) -> None:
        """The connection finished its handshake: a gate that does not make room for
        any newcomer no longer closes it for one (see :class:`Gate`)."""
        self.settled = True


def _errno(error: BaseException) -> int | None:
    """The errno of an ``accept`` failure (anyio wraps it in BrokenResourceError)."""
    if isinstance(error, anyio.BrokenResourceError):
        error = error.__cause__  # type: ignore[assignment]
    return error.errno if isinstance(error, OSError) else None


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class Gate(Generic[S]):
    """Admits connections to one listener (see the module's docstring).

    ``name`` says which listener in log lines ("gRPC port 50050");
    ``make_room``: at the cap, close the least recently active connection
    (:meth:`Slot.touch`) without calls in flight (:meth:`Slot.set_busy`), else
    the least recently active one, for the new one instead of refusing it. Without it,
    the oldest connection still in its handshake (whose handler has not
    called :meth:`Slot.settle`) is closed for the new one; the new one is
    refused only if there is none.
    """

    def __init__(
        self,
        name: str,
        limits: ConnectionLimits,
        *,
        make_room: bool = False,
        throttle: Throttle | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self._make_room = make_room
        self.throttle = throttle or Throttle(log)
        # Open connections, least recently active first; an evicted one moves to
        # _closing (no longer counted against the cap) while it says goodbye.
        self._open: OrderedDict[Slot, None] = OrderedDict()
        self._closing: OrderedDict[Slot, None] = OrderedDict()
        self._placed = 0  # connections accept loops may admit before they look again
        self._loops = 1  # accept loops (one per socket)
        self._released = trio.Event()  # set when an admitted connection has gone
        self._spare: int | None = None

    # -- admission ------------------------------------------------------------

    def _admit(self) -> Slot | None:
        if len(self._open) >= self.limits.max_connections:
            victim = self._victim()
            if victim is None:
                self._refuse()
                return None
            del self._open[victim]
            self._closing[victim] = None
            which = "least recently active" if self._make_room else "oldest still in its handshake"
            self.throttle.log(
                logging.INFO,
                f"{self.name}: closed the {which} connection to make room",
                "%s: %d connections open (the limit: MAX_CONNECTIONS or this port's share of "
                "RLIMIT_NOFILE); closing the %s one to make room",
                self.name,
                self.limits.max_connections,
                which,
                peer="",
            )
            victim.evict()
        slot = Slot(self)
        self._open[slot] = None
        return slot

    def _victim(self) -> Slot | None:
        """The connection to close for a newcomer at the cap; None: refuse the newcomer."""
        if self._make_room:
            # (A scan: the busy ones are few, unless calls the server works on fill the port.)
            now = trio.current_time()
            return next((slot for slot in self._open if not slot.in_flight(now)), None) or next(
                iter(self._open), None
            )
        return next((slot for slot in self._open if not slot.settled), None)

    def _refuse(self) -> None:
        self.throttle.warning(
            f"{self.name}: refused connections at the limit",
            "%s: %d connections open (the limit: MAX_CONNECTIONS or this port's share of "
            "RLIMIT_NOFILE); closing new connections at once",
            self.name,
            len(self._open),
            peer="",
        )

    def _touch(self, slot: Slot) -> None:
        if slot in self._open:
            self._open.move_to_end(slot)

    def _hurried(self) -> Slot:
        """The closing connection to close at once: the oldest without calls in flight,
        else the oldest (at most ``max_closing`` are looked at)."""
        now = trio.current_time()
        return next((slot for slot in self._closing if not slot.in_flight(now)), None) or next(
            iter(self._closing)
        )

    def _release(self, slot: Slot) -> None:
        self._open.pop(slot, None)
        self._closing.pop(slot, None)
        self._released.set()

    @asynccontextmanager
    async def _place(self) -> AsyncIterator[None]:
        """A place for the connection an accept loop takes next, until it is admitted or closed.

        The open connections, those closing to make room and those the accept
        loops may admit stay within ``max_connections + max_closing``: with as
        many, a closing one is hurried (its goodbye cut short: :meth:`_hurried`) and the
        loop waits until one has gone. Each loop takes its place before its
        ``accept`` (one that sits in it while others admit holds one), so a
        port with several sockets stays within it too; its ``max_closing`` is
        raised to its number of loops if below (a loop always finds one
        closing to hurry: open ones are at most ``max_connections``, places
        one fewer than the loops).
        """
        limits = self.limits
        room = limits.max_connections + max(limits.max_closing, self._loops)
        while len(self._open) + len(self._closing) + self._placed >= room:
            if self._released.is_set():  # (each accept loop of this gate waits on the same one)
                self._released = trio.Event()
            self._hurried().hurry()  # its goodbye is cut short
            await self._released.wait()
        self._placed += 1
        try:
            yield
        finally:
            self._placed -= 1

    # -- accepting ------------------------------------------------------------

    @contextmanager
    def _reserve(self) -> Iterator[None]:
        """Hold the spare descriptor (see :meth:`_accept_with_spare`)."""
        self._spare = _open_spare()
        try:
            yield
        finally:
            if self._spare is not None:
                os.close(self._spare)
                self._spare = None

    async def _accept_with_spare(
        self, accept: Callable[[], Awaitable[S]], close: Callable[[S], Awaitable[None]]
    ) -> tuple[S | None, bool]:
        """Accept one waiting connection with the spare descriptor, after EMFILE or ENFILE.

        Returns the connection if a descriptor could be had again for the
        spare (some were freed meanwhile: serve it), else closes it at once
        (shed: the peer is told now instead of waiting in the backlog); and
        whether a connection was taken at all.
        """
        if self._spare is None:
            self._spare = _open_spare()  # re-arm for the next time, if a descriptor is free
            return None, False
        os.close(self._spare)
        self._spare = None
        stream = None
        with (
            trio.move_on_after(MIN_BACKOFF),
            contextlib.suppress(OSError, anyio.BrokenResourceError),
        ):
            stream = await accept()
        self._spare = _open_spare()
        if stream is None:
            return None, False
        if self._spare is None:
            await close(stream)
            self._spare = _open_spare()  # with the descriptor it held
            return None, True
        return stream, True

    async def _accept(
        self, accept: Callable[[], Awaitable[S]], close: Callable[[S], Awaitable[None]]
    ) -> tuple[S, Slot]:
        """The next connection admitted; refused and shed ones are closed on the way."""
        backoff = MIN_BACKOFF
        while True:
            async with self._place():
                try:
                    stream = await accept()
                except (OSError, anyio.BrokenResourceError) as error:
                    code = _errno(error)
                    if code in IGNORED_ERRNOS:
                        continue
                    if code not in CAPACITY_ERRNOS:
                        raise
                    self.throttle.warning(
                        f"{self.name}: out of file descriptors",
                        "%s: cannot accept connections: %s (RLIMIT_NOFILE=%d); closing new "
                        "connections at once until descriptors are free",
                        self.name,
                        os.strerror(code),
                        resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                        peer="",
                    )
                    spared, taken = await self._accept_with_spare(accept, close)
                    if spared is None:
                        if not taken:
                            await trio.sleep(backoff)
                            backoff = min(2 * backoff, MAX_BACKOFF)
                        continue
                    stream = spared
                backoff = MIN_BACKOFF
                slot = self._admit()
                if slot is not None:
                    return stream, slot
                await close(stream)

    async def _run(
        self,
        handle: Callable[[S, Slot], Awaitable[None]],
        close: Callable[[S], Awaitable[None]],
        stream: S,
        slot: Slot,
    ) -> None:
        try:
            with slot.cancel_scope:
                await handle(stream, slot)
        except Exception:
            # A bug in one connection's handler ends that connection, not the listener.
            self.throttle.log(
                logging.ERROR,
                f"{self.name}: connection handler failed",
                "%s: a connection's handler failed",
                self.name,
                peer="",
                exc_info=True,
            )
        finally:
            await close(stream)
            self._release(slot)

    async def serve(
        self,
        accepts: Sequence[Callable[[], Awaitable[S]]],
        close: Callable[[S], Awaitable[None]],
        handle: Callable[[S, Slot], Awaitable[None]],
    ) -> NoReturn:
        """Accept with each of ``accepts`` (one per socket) and run ``handle(stream, slot)``.

        ``close`` closes a stream at once (``trio.aclose_forcefully``); it is
        called for every stream, after its handler returns.
        """
        self._loops = len(accepts)
        with self._reserve():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.throttle.run)
                for accept in accepts:
                    nursery.start_soon(self._accept_forever, accept, close, handle, nursery)
                await trio.sleep_forever()

    async def _accept_forever(
        self,
        accept: Callable[[], Awaitable[S]],
        close: Callable[[S], Awaitable[None]],
        handle: Callable[[S, Slot], Awaitable[None]],
        nursery: trio.Nursery,
    ) -> NoReturn:
        while True:
            # (No locals: the last connection would live as long as this frame waits.)
            nursery.start_soon(self._run, handle, close, *await self._accept(accept, close))


async def serve_listeners(
    gate: Gate[trio.SocketStream],
    listeners: Sequence[trio.SocketListener],
    handle: Callable[[trio.SocketStream, Slot], Awaitable[None]],
) -> NoReturn:
    """:meth:`Gate.serve` for trio listeners; closes them when cancelled."""
    async with contextlib.AsyncExitStack() as stack:
        for listener in listeners:
            await stack.enter_async_context(listener)
        await gate.serve(
            [listener.accept for listener in listeners], trio.aclose_forcefully, handle
        )
