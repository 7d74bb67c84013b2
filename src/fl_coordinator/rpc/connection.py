"""One HTTP/2 connection from a gRPC peer: purerpc's protocol objects, driven under our rules.

purerpc 0.8's own server (``ConnectionHandler`` over ``GRPCProtoSocket``)
trusts its peer:

* each call's task reads its events from a memory stream that nothing
  closes: when the peer closes its socket in the middle of a request, the
  task waits forever for the rest, and the connection (socket, h2 state,
  buffers) waits for its tasks. 20 connections of 100 such calls held 20
  sockets and 24 MB for good;
* RST_STREAM is dropped (``GRPCConnection._stream_reset`` returns no event):
  the call's task runs on, its read buffer is never freed, and its failure
  to answer on the reset stream is a warning: 30,000 resets, 30,000 lines;
* a peer may open 65,536 streams at once, send 16 MiB frames (64 of them as
  one header block) and park 1 GiB of unread data in the connection's
  flow-control window;
* a connection may stay idle forever, and every failed call is a warning;
* a compressed message (``grpc-encoding: gzip``) is inflated whole by
  ``zlib.decompress``, on the event loop, before any call (and its token
  check) starts: 1 MB of deflate stream became 1 GiB, with 2 GB of peak
  memory and the loop frozen 19 s (``GRPC_MAX_MESSAGE_BYTES`` bounds only
  the compressed size); and it expects zlib's format, not gzip's.

Here the same pieces (h2 through purerpc's ``GRPCConnection``, its
``GRPCProtoStream`` and call wrappers) are driven by our own reader, writer
and dispatch:

* when the peer closes, every call's task is cancelled and its state dropped
  at once; so is a call whose stream the peer resets (and the flow-control
  window its unread data held is given back), and a request gets a task only
  with its first message (a half-sent request, or the "rapid reset" attack,
  costs its headers and parsing, nothing more);
* at most :data:`MAX_CONCURRENT_STREAMS` streams at once (an HTTP/2 setting:
  h2 ends a connection that opens more), 16 KiB frames, a connection window
  of two messages, and reading stops while more than :data:`MAX_UNSENT_BYTES`
  of answers wait for a peer that does not read them;
* what the peer sent and no call has read yet (parts of messages, an
  unfinished header block) is counted in the process's
  :class:`~.read_budget.ReadBudget`; over it, the connections whose data
  waited longest are closed (GOAWAY ENHANCE_YOUR_CALM);
* a connection without call traffic (a whole message or a request's end in,
  answers out; request headers alone, resets, part of a message and pings do
  not count: a peer parking half-sent messages is idle), outside the time a
  unary call's method runs (a check-in held while the round aggregates waits
  for us, not the peer for us), for ``idle_timeout`` seconds is closed
  gracefully, and so is one closed to make room for
  another (:class:`~..connections.Gate`, which tells apart, through
  :meth:`~..connections.Slot.set_busy` and
  :meth:`~..connections.Slot.busy_for`, the connections with calls the
  server works on, a whole request in and the answer not waiting for the
  peer's window, and those with a request whose message is arriving, for
  :data:`GOODBYE_TIMEOUT` after each of its bytes: a peer holds requests
  half-sent or answers unread for free, and would otherwise be closed last):
  as gRPC servers do, an HTTP/2 GOAWAY (NO_ERROR) that leaves out no stream
  and a PING, then, once the PING is answered (the peer saw the GOAWAY), a
  second GOAWAY naming the last stream taken in. The calls in flight, and
  the requests taken in, get their messages and send their answers; newer
  streams are refused (REFUSED_STREAM: grpc-go sends those calls again on a
  new connection; grpcio opens none after a GOAWAY). All within
  :data:`GOODBYE_TIMEOUT` of the first GOAWAY, and the gate may cut it short
  to make room; cut short, a last GOAWAY names the last call started (unless
  the socket takes no more bytes: then it closes at once; grpcio and grpc-go
  send the calls it leaves out again), the requests not started are refused
  (grpc-go sends them again; grpcio ends those below a call started
  UNAVAILABLE), and what is still in flight is cancelled.
  Shedding (above) and a peer's protocol errors close at once. (Clients on
  python's ``h2``, purerpc's included, cannot take answers after a GOAWAY:
  h2 closes its side as the GOAWAY arrives, python-hyper/h2 issue 1181);
* a compressed message is inflated up to ``GRPC_MAX_MESSAGE_BYTES`` and no
  further: one that inflates to more is a message over the limit;
* a method whose requests are small by its protocol has a limit of its own
  (:mod:`.request_limits`): a request message over it, by its length prefix
  or as it inflates, is refused before it is buffered whole or parsed
  (``RESOURCE_EXHAUSTED``, the stream reset, its window given back), and the
  connection goes on;
* what goes wrong is logged through a :class:`~..log_throttle.Throttle`,
  with the peer's text cut and escaped; the peer gets a gRPC status.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import select
import socket
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
import h2.events
import h2.exceptions
import purerpc
import trio
from google.protobuf.message import DecodeError
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame, RstStreamFrame
from purerpc.grpc_proto import GRPCProtoStream
from purerpc.grpc_socket import GRPCStreamState
from purerpc.grpclib.buffers import MessageReadBuffer
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import MessageReceived, RequestEnded, RequestReceived, WindowUpdated
from purerpc.grpclib.exceptions import MessageTooLargeError, ProtocolError, StreamClosedError
from purerpc.rpc import Cardinality
from purerpc.server import BoundRPCMethod
from purerpc.wrappers import (
    call_server_stream_stream,
    call_server_stream_unary,
    call_server_unary_stream,
    call_server_unary_unary,
)

from ..connections import Slot
from ..log_throttle import Throttle
from ..untrusted_text import shown
from .read_budget import Account, ReadBudget
from .request_limits import RequestLimits, refusal

__all__ = [
    "GOODBYE_TIMEOUT",
    "LAST_WORD_TIMEOUT",
    "MAX_CONCURRENT_STREAMS",
    "MAX_FRAME_BYTES",
    "MAX_UNSENT_BYTES",
    "BoundedInflation",
    "GrpcServer",
    "initiate_with_window",
]

log = logging.getLogger(__name__)

#: Streams a peer may have open on one connection (HTTP/2 recommends at least 100).
MAX_CONCURRENT_STREAMS = 100
#: Largest HTTP/2 frame accepted (the protocol's default; purerpc asked for 16 MiB).
MAX_FRAME_BYTES = 16384
#: Answers queued for a peer that does not read them, beyond which we stop reading its requests.
MAX_UNSENT_BYTES = 1 << 20
#: Time from a GOAWAY to the socket's close: for the GOAWAY to leave and, on a graceful
#: close, for the calls in flight to finish (a selector's calls take milliseconds); a drain
#: still unfinished then has LAST_WORD_TIMEOUT more for its last GOAWAY.
GOODBYE_TIMEOUT = 1.0
#: Time a connection whose drain is cut short (its GOODBYE_TIMEOUT is up, or the gate
#: needs its place) has to send its last GOAWAY; its peer is not waited for (none at all
#: when the socket takes no more bytes: a peer that does not read would not get it).
LAST_WORD_TIMEOUT = 0.1

#: The first GOAWAY of a graceful close names the highest stream id there may be, and
#: this PING follows it: the streams the peer opened before it saw the GOAWAY arrive
#: before the PING's acknowledgement, and are served (see ``_Connection._drain``).
_ANY_STREAM = 2**31 - 1
_DRAIN_PING = b"draining"
_RECEIVE_BYTES = 65536
#: Reads of what the peer of a drain cut short sent, dropped before the socket is closed.
_DISCARD_READS = 16
_SEND_BYTES = 65536
_DEFAULT_WINDOW = 65535  # HTTP/2's initial connection window

_CALLERS: dict[Cardinality, Callable[[Any, GRPCProtoStream], Awaitable[None]]] = {
    Cardinality.UNARY_UNARY: call_server_unary_unary,
    Cardinality.UNARY_STREAM: call_server_unary_stream,
    Cardinality.STREAM_UNARY: call_server_stream_unary,
    Cardinality.STREAM_STREAM: call_server_stream_stream,
}


def initiate_with_window(protocol: GRPCConnection) -> None:
    """Start ``protocol``'s HTTP/2 connection with a connection window of two of its largest
    messages, as each stream's (purerpc sets those from ``max_message_length``).

    purerpc opens it by 1 GiB, which a peer could fill with data we never
    read; HTTP/2's default, 65,535 bytes, is too small: purerpc gives bytes back
    only for whole messages, so a larger one never came whole (a 64 KiB file
    chunk to the reference client was one).
    """
    protocol.h2_connection.initiate_connection()
    extra = 2 * protocol.config.max_message_length - _DEFAULT_WINDOW
    if extra > 0:
        protocol.h2_connection.increment_flow_control_window(extra)


class _StreamReset:
    """The peer reset a stream (purerpc's ``GRPCConnection`` drops this event)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class _CallTooLarge:
    """A request message over its method's own limit: that call is refused (the stream's
    read buffer is dropped already)."""

    __slots__ = ("limit", "path", "stream_id")

    def __init__(self, stream_id: int, path: str, limit: int) -> None:
        self.stream_id = stream_id
        self.path = path
        self.limit = limit


class _Stream(GRPCProtoStream):
    """purerpc's server stream; tells its connection while its answer waits for the peer's
    flow-control window (the call then waits on the peer, not on the server)."""

    async def _wait_flow_control_update(self) -> None:
        connection: _Connection = self._grpc_socket
        connection._stall(self._stream_id, True)
        try:
            await super()._wait_flow_control_update()
        finally:
            connection._stall(self._stream_id, False)


class BoundedInflation(MessageReadBuffer):
    """A stream's message parser that inflates a compressed message up to the size limit only
    (requests here; answers to the coordinator's own calls in :mod:`.addresses`).

    ``gzip`` and ``deflate`` (gRPC's names: RFC 1952 and RFC 1950 streams)
    are both read, by their header; other encodings are refused as purerpc
    refuses them (that connection ends with a PROTOCOL_ERROR).

    ``limit``: the largest message, in bytes (``max_message_length``, kept
    here: purerpc keeps its copy private). ``path``: the method, when
    ``limit`` is its own (:mod:`.request_limits`: a larger message refuses that
    call only); None for the server's (a larger message ends the connection).
    """

    def __init__(
        self, message_encoding: str | None, max_message_length: int, path: str | None = None
    ) -> None:
        super().__init__(message_encoding, max_message_length)
        self.encoding = message_encoding
        self.limit = max_message_length
        self.path = path

    def decompress(self, data: bytes) -> bytes:
        if self.encoding not in ("gzip", "deflate"):
            return super().decompress(data)
        inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)  # either header
        limit = self.limit
        message = inflater.decompress(data, limit + 1)
        if len(message) > limit:
            raise MessageTooLargeError(f"message inflates to more than {limit} bytes")
        if not inflater.eof:
            raise ProtocolError("compressed message is truncated")
        return message


class _Protocol(GRPCConnection):
    """purerpc's gRPC-over-h2 state machine with our settings; reports resets and traffic."""

    MAX_CONCURRENT_STREAMS = MAX_CONCURRENT_STREAMS
    MAX_INBOUND_FRAME_SIZE = MAX_FRAME_BYTES

    def __init__(self, config: GRPCConfiguration, account: Account, limits: RequestLimits) -> None:
        super().__init__(config)
        #: Methods' own request limits (only those below the server's).
        self.limits = limits
        #: A whole message (or a request's end) arrived since the flag was last cleared.
        self.call_traffic = False
        #: A request's data (not headers alone) arrived since the flag was last cleared.
        self.request_bytes = False
        #: What the connection holds unread, counted in the process's :class:`ReadBudget`.
        self.account = account
        self._header_bytes = 0
        # Flow-controlled bytes received per stream and not yet given back: purerpc
        # gives them back as its call reads each message; a call that ends or is
        # reset before would take them from the connection's window for good.
        self._unacknowledged: dict[int, int] = {}

    def initiate_connection(self) -> None:
        initiate_with_window(self)

    def receive_data(self, data: bytes) -> list[Any]:
        events = super().receive_data(data)
        for event in events:
            if isinstance(event, (MessageReceived, RequestEnded)):
                self.call_traffic = True  # a whole message, or a request's end
        # A header block not finished yet (HEADERS, CONTINUATION...) and a partial frame.
        frames = self.h2_connection.incoming_buffer
        header_bytes = len(frames.data) + sum(len(f.data) for f in frames._headers_buffer)
        self.account.add(header_bytes - self._header_bytes)
        self._header_bytes = header_bytes
        return events

    def _request_received(self, event: h2.events.RequestReceived) -> list[Any]:
        events = super()._request_received(event)
        (request,) = events
        path = f"/{request.service_name}/{request.method_name}"
        limit = self.limits.get(path)
        self.message_read_buffers[event.stream_id] = (
            BoundedInflation(request.message_encoding, self.config.max_message_length)
            if limit is None
            else BoundedInflation(request.message_encoding, limit, path)
        )
        return events

    def _data_received(self, event: h2.events.DataReceived) -> list[Any]:
        if event.stream_id not in self.message_read_buffers:
            # A stream whose call ended: give the window back, drop the data.
            self.h2_connection.acknowledge_received_data(
                event.flow_controlled_length, event.stream_id
            )
            return []
        self.request_bytes = True
        unacknowledged = self._unacknowledged.get(event.stream_id, 0)
        self._unacknowledged[event.stream_id] = unacknowledged + event.flow_controlled_length
        self.account.add(event.flow_controlled_length, data=True)
        try:
            return super()._data_received(event)
        except MessageTooLargeError:
            buffer = self.message_read_buffers[event.stream_id]
            if buffer.path is None:
                raise  # over the server's limit: the connection ends
            self.forget(event.stream_id)  # the rest of its data is dropped as it comes
            return [_CallTooLarge(event.stream_id, buffer.path, buffer.limit)]

    def acknowledge_received_data(self, stream_id: int, flow_controlled_length: int) -> None:
        if stream_id not in self._unacknowledged:
            return  # given back when its call ended
        self._unacknowledged[stream_id] -= flow_controlled_length
        self.account.add(-flow_controlled_length)
        super().acknowledge_received_data(stream_id, flow_controlled_length)

    def forget(self, stream_id: int) -> None:
        """Drop a stream's read buffer; give back the window of what its call did not read."""
        self.message_read_buffers.pop(stream_id, None)
        unread = self._unacknowledged.pop(stream_id, 0)
        self.account.add(-unread)
        if unread > 0:
            self.h2_connection.acknowledge_received_data(unread, stream_id)

    def announce_goaway(self, last_stream_id: int) -> None:
        """Queue a GOAWAY (NO_ERROR) that names ``last_stream_id``; the connection goes on.

        h2's ``close_connection`` would also close its state machine, which then
        refuses to send the answers of the calls still in flight (h2 has no
        draining state), so the frame is queued as h2 queues its own.
        """
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=ErrorCodes.NO_ERROR)
        self.h2_connection._prepare_for_sending([frame])

    def refuse_after_goaway(self, stream_id: int) -> None:
        """Forget a stream and queue its RST_STREAM (REFUSED_STREAM) after a GOAWAY, which
        makes h2 refuse to reset streams (as :meth:`announce_goaway`, the frame is queued
        as h2 queues its own)."""
        self.forget(stream_id)
        frame = RstStreamFrame(stream_id, error_code=ErrorCodes.REFUSED_STREAM)
        self.h2_connection._prepare_for_sending([frame])

    def _ping_acknowledged(self, event: h2.events.PingAcknowledged) -> list[Any]:
        return [event]  # (purerpc drops it)

    def forget_all(self) -> None:
        """Drop every stream's read buffer (the connection ended)."""
        self.message_read_buffers.clear()
        self._unacknowledged.clear()
        self.account.close()

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Any]:
        self.forget(event.stream_id)
        return [_StreamReset(event.stream_id)]


class GrpcServer:
    """Serves ``services`` on each connection handed to :meth:`serve_connection`."""

    def __init__(
        self,
        services: Sequence[purerpc.Service],
        *,
        max_message_bytes: int,
        max_buffered_bytes: int,
        idle_timeout: float | None,
        throttle: Throttle,
        request_limits: RequestLimits | None = None,
    ) -> None:
        self._methods: dict[tuple[str, str], BoundRPCMethod] = {
            (service.name, name): bound
            for service in services
            for name, bound in service.methods.items()
        }
        self.config = GRPCConfiguration(client_side=False, max_message_length=max_message_bytes)
        self.max_message_bytes = max_message_bytes
        self.request_limits: Mapping[str, int] = {
            path: limit
            for path, limit in (request_limits or {}).items()
            if limit < max_message_bytes
        }
        # One sender of a whole message (a connection's window is two) always fits.
        self.budget = ReadBudget(max(max_buffered_bytes, 2 * max_message_bytes), throttle)
        self.idle_timeout = idle_timeout
        self.throttle = throttle

    async def serve_connection(self, stream: anyio.abc.ByteStream, slot: Slot, peer: str) -> None:
        """Serve one connection until the peer closes it, it idles out or breaks the protocol."""
        await _Connection(self, stream, slot, peer).run()

    def method(self, request: RequestReceived) -> BoundRPCMethod | None:
        return self._methods.get((request.service_name, request.method_name))


class _Connection:
    """One connection. Also what purerpc's streams expect of their socket (``flush``,
    ``_streams``)."""

    def __init__(self, server: GrpcServer, stream: anyio.abc.ByteStream, slot: Slot, peer: str):
        self._server = server
        self._stream = stream
        self._slot = slot
        self._peer = peer
        self._protocol = _Protocol(
            server.config, server.budget.open(self._shed), server.request_limits
        )
        self._h2 = self._protocol.h2_connection
        self._requests: dict[int, RequestReceived] = {}  # headers in, no message yet
        self._streams: dict[int, GRPCProtoStream] = {}  # purerpc's streams delete themselves here
        self._calls: dict[int, trio.CancelScope] = {}
        self._whole: set[int] = set()  # calls whose request came whole (its end in)
        self._stalled: set[int] = set()  # calls whose answer waits for the peer's window
        self._refusals: dict[int, purerpc.Status] = {}  # calls cancelled for a large message
        self._wake_writer = trio.Event()
        self._sent = trio.Event()
        self._watchdog = trio.CancelScope()  # reading, until idle or evicted
        self._draining = trio.CancelScope()  # then, until the calls in flight are done
        self._drained = trio.Event()
        self._farewell = trio.CancelScope()  # the goodbye: sending the GOAWAY, lingering
        self._lingering = trio.CancelScope()  # (reading until the peer closes)
        self._last_stream_id: int | None = None  # the last GOAWAY's, once draining
        self._deadline = math.inf  # when the socket is closed, once saying goodbye
        self._working = 0  # unary calls whose method runs (see _at_work)
        self._over_budget = False
        self._closing = False  # the writer sends what is queued, then stops
        self._written = trio.Event()
        slot.evict = self._evict
        slot.hurry = self._hurry

    # -- what GRPCStream calls -------------------------------------------------

    async def flush(self) -> None:
        self._wake_writer.set()

    # -- life of the connection ----------------------------------------------------

    def _evict(self) -> None:
        """Closed to make room (while it drains already, nothing changes)."""
        self._watchdog.cancel()

    def _hurry(self) -> None:
        """Its goodbye cut short to make room (the gate keeps few connections closing):
        a last GOAWAY if it still drains (:meth:`_cut_short`), within
        :data:`LAST_WORD_TIMEOUT` (at once if it cannot leave), and no more waiting for
        its peer."""
        self._watchdog.cancel()
        self._draining.cancel()
        self._lingering.cancel()
        self._farewell.deadline = min(self._farewell.deadline, self._last_word_deadline())

    def _last_word_deadline(self) -> float:
        """When a drain cut short closes: in :data:`LAST_WORD_TIMEOUT`, or now if its last
        word cannot leave (the socket's send buffer is full: the peer does not read).

        The gate waits for a hurried connection before it accepts the next one: a
        peer that never reads would otherwise make every accept under a flood of
        dials wait LAST_WORD_TIMEOUT (10 a second at most).
        """
        now = trio.current_time()
        return now + LAST_WORD_TIMEOUT if self._takes_bytes() else now

    def _raw_socket(self) -> socket.socket | None:
        """The socket beneath the stream (beneath TLS too), if there is one."""
        return self._stream.extra(anyio.abc.SocketAttribute.raw_socket, None)

    def _takes_bytes(self) -> bool:
        """Whether the socket takes more bytes now (poll: writable); True without one."""
        raw = self._raw_socket()
        if raw is None:
            return True
        poller = select.poll()
        try:
            poller.register(raw, select.POLLOUT)
        except (OSError, ValueError):  # (closed)
            return False
        return any(mask & select.POLLOUT for _, mask in poller.poll(0))

    def _shed(self) -> None:
        """Closed for holding unread data when the process's budget ran out (at once)."""
        self._over_budget = True
        self._watchdog.cancel()
        self._draining.cancel()

    def _touch(self) -> None:
        """Call traffic: the connection is not idle, and the last one to close for room."""
        self._slot.touch()
        if self._server.idle_timeout is not None:
            self._watchdog.deadline = (
                math.inf if self._working else trio.current_time() + self._server.idle_timeout
            )

    async def _at_work(self, method: Callable[[Any], Awaitable[Any]], message: Any) -> Any:
        """A unary call's method, whose time is not idle time: the peer waits for us.

        A check-in that arrives while the round aggregates is held until the
        aggregation ends, which for a large model may take longer than
        ``idle_timeout``; its connection was closed as idle, and the check-in
        cancelled. Only the method's own time counts: an answer the peer does
        not read is idle time again (``_touch`` when the method returns).
        """
        self._working += 1
        self._touch()
        try:
            return await method(message)
        finally:
            self._working -= 1
            self._touch()

    async def run(self) -> None:
        self._protocol.initiate_connection()
        self._touch()
        try:
            await self._run()
        finally:
            self._release()

    def _release(self) -> None:
        """Drop the per-stream state now.

        h2's connection object is a reference cycle (its frame dispatch table
        holds bound methods), so what hangs off it would wait for the cyclic
        garbage collector: 100 streams per connection, for minutes.
        """
        self._requests.clear()
        self._streams.clear()
        self._whole.clear()
        self._stalled.clear()
        self._refusals.clear()
        self._protocol.forget_all()
        self._h2.streams.clear()
        self._h2._closed_streams.clear()

    async def _run(self) -> None:
        async with trio.open_nursery() as connection:
            connection.start_soon(self._write, connection.cancel_scope)
            async with trio.open_nursery() as calls:
                polite = False  # (cut short: idle, evicted or shed)
                with self._watchdog:
                    polite = await self._read(calls)
                if self._watchdog.cancelled_caught and not self._over_budget:
                    polite = await self._drain(calls)  # idle, or closed to make room
                    if self._draining.cancelled_caught and not self._over_budget:
                        polite = self._cut_short()  # its time is up, or hurried
                calls.cancel_scope.cancel()  # whatever ended the connection ends its calls
            if self._over_budget:
                reason = "half-sent requests held too long while the server's buffers were full"
                self._go_away(ErrorCodes.ENHANCE_YOUR_CALM, reason)
            if polite or self._over_budget:
                await self._goodbye(linger=not self._over_budget)
            connection.cancel_scope.cancel()

    async def _drain(self, calls: trio.Nursery) -> bool:
        """Close gracefully, as gRPC servers do: the calls in flight finish first.

        A GOAWAY (NO_ERROR) that leaves out no stream, and a PING; when the
        peer acknowledges the PING, it saw the GOAWAY, and a second one names
        the last stream taken in. Meanwhile the connection reads on, so that
        those calls get their messages and their answers are sent; streams
        opened after the second GOAWAY are refused (REFUSED_STREAM: the peer's
        gRPC library retries such a call on a new connection, as it does the
        calls the GOAWAY leaves out: they never ran). Done when the PING came
        back and no call is left; within :data:`GOODBYE_TIMEOUT` of the first
        GOAWAY, the goodbye included (then :meth:`_cut_short`); the gate's hurry
        and shedding (:meth:`_shed`) cut it short.

        Returns whether to say goodbye: False if the peer closed or it was cut
        short (as :meth:`_read`: True, a GOAWAY with a reason is queued).
        """
        self._deadline = trio.current_time() + GOODBYE_TIMEOUT
        self._last_stream_id = _ANY_STREAM
        self._protocol.announce_goaway(_ANY_STREAM)
        try:
            self._h2.ping(_DRAIN_PING)
        except h2.exceptions.ProtocolError:  # the peer sent a GOAWAY: no PING
            self._last_goaway()
        self._wake_writer.set()
        polite = True

        async def read(done: trio.CancelScope) -> None:
            nonlocal polite
            polite = await self._read(calls)
            done.cancel()  # the peer closed, or broke the protocol: nothing to wait for

        self._draining.deadline = self._deadline
        with self._draining:
            async with trio.open_nursery() as reading:
                reading.start_soon(read, reading.cancel_scope)
                self._settle()
                await self._drained.wait()
                reading.cancel_scope.cancel()
        return polite and not self._draining.cancelled_caught

    def _cut_short(self) -> bool:
        """The drain's time is up, or the gate hurried it: tell the peer which of its
        calls never started, within :data:`LAST_WORD_TIMEOUT` (none if the socket takes
        no more bytes: :meth:`_last_word_deadline`), without waiting for it. A last
        GOAWAY names the last call started (0: none), so that the peer's gRPC library
        sends the others again on a new connection, as those a drain leaves out; then the
        requests taken in without a call are refused (REFUSED_STREAM: grpc-go sends them
        again too; grpcio only those the GOAWAY left out, hence the order); the calls in
        flight are cancelled.

        Before, the connection was closed at once: a call whose request the server had
        not read or started yet, which the first GOAWAY (any stream) said was taken in,
        ended UNAVAILABLE. Returns True: say goodbye.
        """
        started = max(self._calls, default=0)
        last = self._last_stream_id
        self._last_stream_id = started if last is None else min(last, started)
        # The GOAWAY first: grpcio (1.85) sends again a call whose stream a GOAWAY leaves
        # out, but ends one refused by RST_STREAM (REFUSED_STREAM) UNAVAILABLE; grpc-go
        # sends either again. The refusals follow, for the requests the GOAWAY cannot
        # leave out (below a call started) and for other clients.
        self._go_away(ErrorCodes.NO_ERROR)
        for stream_id in self._requests:
            self._protocol.refuse_after_goaway(stream_id)
        self._requests.clear()
        self._lingering.cancel()
        self._deadline = self._last_word_deadline()
        return True

    def _last_goaway(self) -> None:
        """The peer saw the first GOAWAY: name the last stream taken in."""
        self._last_stream_id = self._h2.highest_inbound_stream_id
        self._protocol.announce_goaway(self._last_stream_id)

    def _settle(self) -> None:
        """Tell the gate whether the server works on a call here (it closes a connection
        without first): one whose request came whole and whose answer does not wait for
        the peer's window. While draining, tell the drain when no call (nor request taken
        in) is left and the peer saw the GOAWAY."""
        busy = bool(self._whole - self._stalled)
        if busy != self._slot.busy:
            self._slot.set_busy(busy)
        if not self._requests:
            self._slot.busy_for(0)  # (no request on its way)
        in_flight = self._calls or self._requests
        if not in_flight and self._last_stream_id not in (None, _ANY_STREAM):
            self._drained.set()

    def _stall(self, stream_id: int, stalled: bool) -> None:
        """A call's answer waits for the peer's window (True), or no longer (False)."""
        if stalled:
            self._stalled.add(stream_id)
        else:
            self._stalled.discard(stream_id)
        self._settle()

    def _go_away(self, code: ErrorCodes, reason: str | None = None) -> None:
        """Queue a GOAWAY (unless one was already sent or received; while draining, it
        names no later stream than the last one did: HTTP/2 forbids raising it)."""
        if self._h2.state_machine.state == ConnectionState.CLOSED:
            return  # (h2 would send another)
        last = self._last_stream_id
        if last is not None:
            last = min(last, self._h2.highest_inbound_stream_id)
        self._h2.close_connection(
            code, additional_data=reason.encode() if reason else None, last_stream_id=last
        )

    async def _goodbye(self, *, linger: bool) -> None:
        """Let the writer send what is queued (the GOAWAY), within :data:`GOODBYE_TIMEOUT`
        (of the first GOAWAY, if the connection drained; :data:`LAST_WORD_TIMEOUT`, if its
        drain was cut short).

        With ``linger``, then read (and drop) what the peer still sends until
        it closes, within the same time (cut short: only what has arrived):
        closing a socket with unread data resets the connection, and the peer
        may lose the GOAWAY and its reason (and, after draining, the last answers).
        """
        self._closing = True
        self._wake_writer.set()
        self._deadline = min(self._deadline, trio.current_time() + GOODBYE_TIMEOUT)
        self._farewell.deadline = min(self._farewell.deadline, self._deadline)
        with self._farewell:
            await self._written.wait()
            if not linger:
                return
            try:
                if isinstance(self._stream, anyio.abc.SocketStream):
                    # (anyio passes on shutdown's OSError as it is: ENOTCONN when the
                    # peer reset the connection since the last bytes were sent)
                    await self._stream.send_eof()  # the peer closes at once (not over TLS)
                with self._lingering:
                    while await self._stream.receive(_RECEIVE_BYTES):
                        pass
                if self._lingering.cancelled_caught:  # cut short: the peer is not waited for
                    self._discard_arrived()
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ):
                pass

    def _discard_arrived(self) -> None:
        """Read and drop, without waiting, what the peer sent and no one read (at most
        :data:`_DISCARD_READS` reads): the socket then closes with a FIN, not a reset
        that may lose the GOAWAY on its way to the peer."""
        raw = self._raw_socket()
        if raw is None:
            return
        with contextlib.suppress(OSError):  # (BlockingIOError: nothing more has arrived)
            for _ in range(_DISCARD_READS):
                if not raw.recv(_RECEIVE_BYTES, socket.MSG_DONTWAIT):
                    return

    async def _write(self, connection_scope: trio.CancelScope) -> None:
        """Send what h2 queues, as it is queued, until closing and all is sent.

        A dead socket ends the connection. The writer is only cancelled when
        nothing more is to be sent: a chunk taken from h2 and cancelled on
        its way would be lost (the GOAWAY, say).
        """
        try:
            while True:
                self._wake_writer = trio.Event()
                data = self._protocol.data_to_send(_SEND_BYTES)
                if data:
                    await self._stream.send(data)
                    self._sent.set()
                    self._sent = trio.Event()
                elif self._closing:
                    self._written.set()
                    return
                else:
                    await self._wake_writer.wait()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            connection_scope.cancel()

    def _unsent(self) -> int:
        # purerpc's patched H2Connection keeps its outbound bytes in this bytearray.
        return len(self._h2._data_to_send)

    async def _read(self, calls: trio.Nursery) -> bool:
        """Feed the peer's bytes to h2 until it closes (False) or breaks the protocol (True).

        True: a GOAWAY is queued, with the reason, to be sent before closing.
        """
        while True:
            while self._unsent() > MAX_UNSENT_BYTES:
                await self._sent.wait()
            try:
                data = await self._stream.receive(_RECEIVE_BYTES)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return False
            try:
                events = self._protocol.receive_data(data)
            except MessageTooLargeError:
                return self._too_large()
            except Exception as error:
                # The peer's bytes broke h2 (which queued a GOAWAY) or purerpc's parsing
                # of them (bad headers, a body-less request): that connection only.
                self._go_away(ErrorCodes.PROTOCOL_ERROR)
                self._peer_broke("gRPC connection broke the protocol", error)
                return True
            self._server.budget.fit(self._protocol.account)
            if self._protocol.call_traffic:
                self._protocol.call_traffic = False
                self._touch()
            self._dispatch(events, calls)
            if self._protocol.request_bytes:
                self._protocol.request_bytes = False
                if self._requests:  # a request's message on its way: let it come
                    self._slot.busy_for(GOODBYE_TIMEOUT)
            self._settle()
            self._wake_writer.set()

    def _peer_broke(self, kind: str, error: Exception) -> None:
        """The peer's mistake, not ours: a debug line (throttled), its text cut and escaped."""
        self._server.throttle.log(
            logging.DEBUG, kind, "%s (from %s): %s", kind, self._peer, shown(repr(error))
        )

    def _too_large(self) -> bool:
        limit = self._server.max_message_bytes
        self._server.throttle.warning(
            "refused a gRPC message larger than GRPC_MAX_MESSAGE_BYTES",
            "refused a gRPC message larger than GRPC_MAX_MESSAGE_BYTES=%d from %s; "
            "connection closed",
            limit,
            self._peer,
        )
        # The reason travels in the GOAWAY; grpcio shows it in the error's details.
        reason = f"message larger than the server's limit of {limit} bytes"
        self._go_away(ErrorCodes.ENHANCE_YOUR_CALM, reason)
        return True

    # -- calls ----------------------------------------------------------------------

    def _dispatch(self, events: list[Any], calls: trio.Nursery) -> None:
        for event in events:
            if isinstance(event, WindowUpdated):
                waiting = self._streams.values() if event.stream_id == 0 else (
                    [self._streams[event.stream_id]] if event.stream_id in self._streams else []
                )  # fmt: skip
                for stream in waiting:
                    stream._flow_control_update_event.set()
            elif isinstance(event, _CallTooLarge):
                self._refuse_too_large(event)
            elif isinstance(event, h2.events.PingAcknowledged):
                if event.ping_data == _DRAIN_PING and self._last_stream_id == _ANY_STREAM:
                    self._last_goaway()
            elif isinstance(event, _StreamReset):
                self._requests.pop(event.stream_id, None)
                scope = self._calls.get(event.stream_id)
                if scope is not None:
                    scope.cancel()  # its task drops the stream (purerpc's code may still use it)
            elif isinstance(event, RequestReceived):
                if self._last_stream_id is not None and event.stream_id > self._last_stream_id:
                    self._refuse(event.stream_id)  # opened after the GOAWAY
                    continue
                # No task until the first message: a request that never comes whole
                # (or is reset at once) costs its headers, not a task and a stream.
                self._requests[event.stream_id] = event
            else:  # MessageReceived, RequestEnded
                request = self._requests.pop(event.stream_id, None)
                stream = (
                    self._streams.get(event.stream_id)
                    if request is None
                    else self._start_call(request, calls)
                )
                if stream is None:
                    continue  # a call that ended or was reset
                stream._incoming_events[0].send_nowait(event)
                if isinstance(event, RequestEnded):
                    stream._close_remote()
                    self._whole.add(event.stream_id)

    def _refuse(self, stream_id: int) -> None:
        """A stream the GOAWAY left out: not run; the peer may retry it elsewhere."""
        self._protocol.forget(stream_id)
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)

    def _refuse_too_large(self, event: _CallTooLarge) -> None:
        """A request message over its method's limit: RESOURCE_EXHAUSTED for that call.

        Usually its first message (the call has no task yet): answered at
        once, trailers only, and the stream reset (NO_ERROR: the peer stops
        sending the rest). A later message of a streaming call cancels its
        task, which answers the same (:meth:`_answer`).
        """
        path = shown(event.path)
        self._server.throttle.warning(
            "refused a gRPC request larger than its method's limit",
            "refused a request message larger than the limit of %d bytes for %s from %s "
            "(RESOURCE_EXHAUSTED); the connection goes on",
            event.limit,
            path,
            self._peer,
        )
        status = refusal(path, event.limit)
        if self._requests.pop(event.stream_id, None) is not None:
            with contextlib.suppress(h2.exceptions.H2Error):
                self._protocol.respond_status(event.stream_id, status, "+proto")
                self._h2.reset_stream(event.stream_id, ErrorCodes.NO_ERROR)
        elif (scope := self._calls.get(event.stream_id)) is not None:
            self._refusals[event.stream_id] = status
            scope.cancel()

    def _start_call(self, request: RequestReceived, calls: trio.Nursery) -> GRPCProtoStream:
        stream = _Stream(self._protocol, request.stream_id, self, self)
        stream._incoming_events[0].send_nowait(request)
        self._streams[request.stream_id] = stream
        scope = self._calls[request.stream_id] = trio.CancelScope()
        calls.start_soon(self._answer, stream, scope)
        return stream

    async def _answer(self, stream: GRPCProtoStream, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self._call(stream)
            refused = self._refusals.pop(stream.stream_id, None)
            if refused is not None:
                await self._close(stream, refused)
        finally:
            self._end_call(stream.stream_id)

    def _end_call(self, stream_id: int) -> None:
        """Drop what the call held; tell the peer to stop sending on it if it has not."""
        self._calls.pop(stream_id, None)
        self._streams.pop(stream_id, None)
        self._whole.discard(stream_id)
        self._stalled.discard(stream_id)
        self._protocol.forget(stream_id)
        # Fails when closed both ways (the usual case) or reset by the peer.
        with contextlib.suppress(h2.exceptions.H2Error):
            self._h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        self._touch()
        self._settle()
        self._wake_writer.set()

    async def _call(self, stream: GRPCProtoStream) -> None:
        """purerpc's dispatch (``ConnectionHandler.request_received``) with our error policy."""
        try:
            await stream.start_response()
            request = await stream.receive_event()
            bound = self._server.method(request)
            if bound is None:
                path = shown(f"/{request.service_name}/{request.method_name}")
                status = purerpc.Status(purerpc.StatusCode.UNIMPLEMENTED, f"{path} is not served")
                await self._close(stream, status)
                return
            stream.expect_message_type(bound.signature.request_type)
            call = functools.partial(bound.method_fn, request=request)
            if bound.signature.cardinality is Cardinality.UNARY_UNARY:
                call = functools.partial(self._at_work, call)
            await _CALLERS[bound.signature.cardinality](call, stream)
        except purerpc.RpcFailedError as error:
            await self._close(stream, error.status)
        except (ProtocolError, StreamClosedError, h2.exceptions.H2Error, DecodeError) as error:
            # The peer broke the call: two messages for one, an unparsable one, a reset.
            self._peer_broke("gRPC call broken by its peer", error)
            reason = f"malformed call: {shown(str(error) or type(error).__name__)}"
            await self._close(stream, purerpc.Status(purerpc.StatusCode.INTERNAL, reason))
        except Exception:
            self._server.throttle.log(
                logging.ERROR,
                "gRPC call failed",
                "gRPC call from %s failed",
                self._peer,
                exc_info=True,
            )
            status = purerpc.Status(purerpc.StatusCode.INTERNAL, "internal error")
            await self._close(stream, status)

    async def _close(self, stream: GRPCProtoStream, status: purerpc.Status) -> None:
        """End the call with ``status`` if it is still ours to end."""
        if stream.state in (GRPCStreamState.HALF_CLOSED_LOCAL, GRPCStreamState.CLOSED):
            return
        with contextlib.suppress(h2.exceptions.H2Error, StreamClosedError):
            await stream.close(status)
