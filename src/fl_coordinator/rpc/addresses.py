"""Peer addresses (selector ids, the legacy webserver): parsing ``host:port``, dialing, calling.

The peers the coordinator calls are as untrusted as those that call it: a
selector answers GoalCountReached, anyone may listen at WEBSERVER_ADDRESS.
purerpc's client takes answers of up to 32 MiB and inflates a compressed one
whole with ``zlib.decompress``, on the event loop: a 4 MB answer
(``grpc-encoding: gzip``) that inflated to 4 GiB froze the loop for 21 s and
took 8 GB of memory, a 32 MiB one would end the process. So every
connection dialed here takes answers of at most :data:`MAX_ANSWER_BYTES`,
inflated up to that and no further (one over it fails that call), and opens
no more flow-control window than two such answers.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, TypeVar

import anyio
import anyio.abc
import h2.exceptions
import purerpc
import trio
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings
from purerpc.client import _Channel
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpc_socket import SocketWrapper
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import ResponseEnded
from purerpc.grpclib.status import Status, StatusCode

from ..errors import BadAddress
from .connection import BoundedInflation, initiate_with_window

__all__ = [
    "MAX_ANSWER_BYTES",
    "BoundedChannel",
    "WatchedStream",
    "answer_socket",
    "call_once",
    "connect",
    "dial",
    "first_cause",
    "refuses_streams",
    "split_address",
]

#: The largest answer (after inflation) taken from a peer the coordinator calls: its
#: calls (GoalCountReached, FlStatus/RoundStatus) are answered with a few bytes.
MAX_ANSWER_BYTES = 1 << 20

log = logging.getLogger(__name__)

T = TypeVar("T")

_ENDED = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError)

#: Bytes of the peer's first answer kept, to tell what listens there.
_FIRST_BYTES = 32


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; raise BadAddress."""
    host, sep, port_text = address.rpartition(":")
    # ASCII digits only: str.isdigit() also holds for "²" (which int() refuses) and
    # for other scripts' digits (which int() reads: Arabic-Indic 50051 would be port 50051).
    digits = port_text.isascii() and port_text.isdigit()
    if not sep or not host or not digits or not 0 < int(port_text) < 65536:
        raise BadAddress(f"selector id {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


#: The gRPC status of a call whose stream the peer reset, by the reset's HTTP/2 error code
#: (gRPC's PROTOCOL-HTTP2.md, "Errors"); any other code: INTERNAL.
_RESET_STATUS = {
    ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,  # not processed: safe to send again
    ErrorCodes.CANCEL: StatusCode.CANCELLED,
    ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}


class WatchedStream(anyio.abc.ByteStream):
    """An anyio byte stream that sets :attr:`ended` when it ends, breaks or is closed (and,
    under :func:`answer_socket`, when the peer's GOAWAY arrives).

    purerpc's reader just stops at the end of the stream (and its writer at a
    broken one) without telling anyone, so a call waiting for its answer on a
    connection its peer closed would wait for ever: whoever holds the
    connection waits on :attr:`ended` instead, and ends the calls on it.
    """

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream
        self.ended = trio.Event()
        self.first_bytes = b""  # what the peer sent first (at most _FIRST_BYTES)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            data = await self._stream.receive(max_bytes)
        except _ENDED:
            self.ended.set()
            raise
        if len(self.first_bytes) < _FIRST_BYTES:
            self.first_bytes += data[: _FIRST_BYTES - len(self.first_bytes)]
        return data

    async def send(self, item: bytes) -> None:
        try:
            await self._stream.send(item)
        except _ENDED:
            self.ended.set()
            raise

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        self.ended.set()
        await self._stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Any]:
        return self._stream.extra_attributes


class _AnswerProtocol(GRPCConnection):
    """purerpc's client state machine, with answers bounded (:data:`MAX_ANSWER_BYTES`), that
    calls ``on_goaway`` when the peer's GOAWAY arrives, and ends a call whose stream the
    peer resets with the gRPC status of the reset's code (:data:`_RESET_STATUS`): purerpc
    ignores resets, and the call waited out its time limit."""

    def __init__(self, config: GRPCConfiguration, on_goaway: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_goaway = on_goaway
        self._unanswered: set[int] = set()  # streams of calls the peer has not ended

    def start_request(self, stream_id: int, *args: Any, **kwargs: Any) -> None:
        super().start_request(stream_id, *args, **kwargs)
        self._unanswered.add(stream_id)

    def _stream_ended(self, event: Any) -> list[Any]:
        self._unanswered.discard(event.stream_id)
        return super()._stream_ended(event)  # type: ignore[no-any-return]

    def _stream_reset(self, event: Any) -> list[Any]:
        if event.stream_id not in self._unanswered:  # answered already: nothing waits
            return []
        self._unanswered.discard(event.stream_id)
        self.message_read_buffers.pop(event.stream_id, None)
        code = event.error_code  # h2 gives an ErrorCodes member, or the int of an unknown code
        name = code.name if isinstance(code, ErrorCodes) else str(code)
        status = _RESET_STATUS.get(code, StatusCode.INTERNAL)
        why = f"the peer reset the call's stream (HTTP/2 {name})"
        return [ResponseEnded(event.stream_id, Status(status, why))]

    def _set_h2_connection_local_settings(self) -> None:
        # purerpc leaves h2's server push on; gRPC never pushes. Off, a peer's PUSH_PROMISE
        # breaks the connection (h2's ProtocolError) instead of filling its window with
        # streams no call reads, until every call on it waited out its limit.
        super()._set_h2_connection_local_settings()
        values = {**self.h2_connection.local_settings, SettingCodes.ENABLE_PUSH: 0}
        self.h2_connection.local_settings = Settings(client=True, initial_values=values)

    def initiate_connection(self) -> None:
        initiate_with_window(self)

    def _response_received(self, event: Any) -> list[Any]:
        events = super()._response_received(event)
        if event.stream_id in self.message_read_buffers:  # a message may follow the headers
            self.message_read_buffers[event.stream_id] = BoundedInflation(
                events[0].message_encoding, self.config.max_message_length
            )
        return events

    def _connection_terminated(self, event: Any) -> list[Any]:
        # h2 closes its side as a GOAWAY arrives and refuses every frame after it (python-hyper/h2
        # issue 1181): the answers to the calls in flight can no longer be read.
        self._on_goaway()
        return super()._connection_terminated(event)  # type: ignore[no-any-return]


#: The streams of the calls started in this context, when someone keeps count (see
#: :meth:`BoundedChannel.calls_cancelled_on_exit`).
_STARTED: ContextVar[list[int] | None] = ContextVar("_STARTED", default=None)


class _Nowhere:
    """Takes events, and the end of a stream, to no one."""

    async def send(self, event: Any) -> None:
        pass


class _Dropped:
    """What purerpc's reader finds for a stream :meth:`_AnswerSocket.cancel` dropped."""

    _incoming_events = (_Nowhere(), None)

    def _close_remote(self) -> None:
        pass


_DROPPED = _Dropped()


class _Records(dict[int, Any]):
    """purerpc's records of a connection's streams, by id; a stream no longer recorded is
    looked up as :data:`_DROPPED`: purerpc's reader hands out the events of one read one at
    a time (each a checkpoint) and looks each one's stream up again, and a call cancelled
    meanwhile has dropped its record (a KeyError there ended the connection)."""

    def __missing__(self, stream_id: int) -> Any:
        return _DROPPED


class _AnswerSocket(GRPCProtoSocket):
    """purerpc's client socket over :class:`_AnswerProtocol`."""

    def __init__(self, config: GRPCConfiguration, stream: WatchedStream) -> None:
        super().__init__(config, stream)
        self._grpc_connection = _AnswerProtocol(config, stream.ended.set)
        self._socket = SocketWrapper(self._grpc_connection, stream)
        self._streams = _Records()

    async def start_request(self, *args: Any, **kwargs: Any) -> Any:
        stream = await super().start_request(*args, **kwargs)
        started = _STARTED.get()
        if started is not None:
            started.append(stream.stream_id)
        return stream

    def cancel(self, stream_id: int) -> None:
        """Reset the stream of a call not answered yet (RST_STREAM CANCEL) and drop what
        purerpc holds of it: h2 then drops what the peer still sends on it, and what a read
        already carried goes nowhere (:class:`_Records`)."""
        protocol = self._grpc_connection
        if stream_id not in protocol._unanswered:
            return  # answered, or reset by the peer
        protocol._unanswered.discard(stream_id)
        protocol.message_read_buffers.pop(stream_id, None)
        self._streams.pop(stream_id, None)
        with contextlib.suppress(h2.exceptions.H2Error):  # (h2 closed: a GOAWAY came)
            protocol.h2_connection.reset_stream(stream_id, ErrorCodes.CANCEL)
            self._socket._flush_event.set()  # (what purerpc's flush() does, without a wait)


def answer_socket(stream: WatchedStream) -> GRPCProtoSocket:
    """purerpc's client socket over ``stream``, taking answers of at most
    :data:`MAX_ANSWER_BYTES` (after inflation): for every connection we dial, the
    coordinator's and the reference selector's and client's alike. A GOAWAY from the peer
    ends ``stream`` (:attr:`WatchedStream.ended`): nothing more can come through it."""
    return _AnswerSocket(
        GRPCConfiguration(client_side=True, max_message_length=MAX_ANSWER_BYTES), stream
    )


async def connect(host: str, port: int, ssl_context: ssl.SSLContext | None) -> WatchedStream:
    """A TCP connection to ``host:port``, over TLS with ``ssl_context`` (gRPC peers close
    without TLS's close_notify, so none is expected).

    A peer that ends the connection during the TLS handshake raises ConnectionError
    saying so (anyio raises EndOfStream or BrokenResourceError there, without a word).
    """
    try:
        stream = await anyio.connect_tcp(
            host,
            port,
            ssl_context=ssl_context,
            tls=ssl_context is not None,
            tls_standard_compatible=False,
        )
    except (anyio.EndOfStream, anyio.BrokenResourceError) as error:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ConnectionError(f"{where} ended the connection during the TLS handshake") from error
    return WatchedStream(stream)


def refuses_streams(grpc_socket: GRPCProtoSocket) -> bool:
    """Whether h2 opens no more streams on ``grpc_socket``'s connection: a GOAWAY came (h2
    closes its side as it arrives), or the connection failed."""
    h2_state = grpc_socket._grpc_connection.h2_connection.state_machine.state
    return h2_state is ConnectionState.CLOSED


class BoundedChannel(_Channel):  # type: ignore[misc]
    """purerpc's channel, connected through :class:`_AnswerSocket` over a
    :class:`WatchedStream` (:attr:`stream`, None until connected)."""

    stream: WatchedStream | None = None

    async def __aenter__(self) -> BoundedChannel:
        await contextlib.AsyncExitStack.__aenter__(self)
        self.stream = await connect(self._host, self._port, self._ssl_context)
        self._grpc_socket = await self.enter_async_context(answer_socket(self.stream))
        return self

    def takes_calls(self) -> bool:
        """Whether a call started now can be answered: connected, no GOAWAY received (h2
        then refuses new streams), and the peer has not ended the TCP connection (an end of
        stream or a reset, seen by peeking: purerpc's reader learns of it only when it next
        runs, and a call started before that would fail on the closed connection)."""
        if self.stream is None or self._grpc_socket is None or self.stream.ended.is_set():
            return False
        if refuses_streams(self._grpc_socket):
            return False
        try:
            sock = self.stream.extra(anyio.abc.SocketAttribute.raw_socket)
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True  # open, nothing to read: the usual case
        except OSError:  # reset
            return False

    @contextlib.contextmanager
    def calls_cancelled_on_exit(self) -> Iterator[None]:
        """Calls started within that are not answered when it is left (cancelled, timed
        out) are reset (RST_STREAM CANCEL), as gRPC clients do (see
        :meth:`_AnswerSocket.cancel`).

        Otherwise the peer goes on working on them, and the connection kept for
        the next calls keeps their streams open, each one of the peer's
        MAX_CONCURRENT_STREAMS (at 100 calls a selector never answered, every
        later call failed at once with h2's TooManyStreamsError until the
        connection ended). Calls are recorded through a context variable: a task
        started within inherits it, and its calls still in flight when this is left
        would be reset too; start none here.
        """
        started: list[int] = []
        token = _STARTED.set(started)
        try:
            yield
        finally:
            _STARTED.reset(token)
            if self._grpc_socket is not None:
                for stream_id in started:
                    self._grpc_socket.cancel(stream_id)

    async def wait_ended(self) -> None:
        """Return once the connection has ended: its peer closed it or sent GOAWAY, it broke,
        or it was closed (at once if it never was connected)."""
        if self.stream is not None:
            await self.stream.ended.wait()


@contextlib.asynccontextmanager
async def dial(
    address: str, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[BoundedChannel]:
    """A purerpc channel connected to ``host:port``: over TLS with ``ssl_context``.

    With TLS the peer's certificate must name the address's host (an IP
    address or a DNS name). Leaving the context closes the connection's
    socket: purerpc's channel leaves that to the garbage collector, so a
    process that dials often would hold one descriptor per past call.
    """
    host, port = split_address(address)
    channel = BoundedChannel(host, port, ssl_context)
    try:
        async with channel:
            yield channel
    finally:
        if channel.stream is not None:  # connected
            with trio.CancelScope(shield=True):
                await channel.stream.aclose()


def first_cause(group: ExceptionGroup[Exception]) -> Exception:
    """The first error in purerpc's (and anyio's) nested task groups, whose text is only
    "Exceptions from Trio nursery (1 sub-exception)"."""
    error: Exception = group
    while isinstance(error, ExceptionGroup):
        error = error.exceptions[0]
    return error


async def call_once(
    address: str,
    call: Callable[[purerpc.Channel], Awaitable[T]],
    *,
    seconds: float,
    ssl_context: ssl.SSLContext | None = None,
) -> T:
    """``call(channel)`` on a connection of its own to ``address``, closed after it.

    A call that fails raises its first error, out of purerpc's task groups.

    The whole of it (connecting, the call, closing) has ``seconds``:
    TimeoutError after that, so a peer that accepts the connection and never
    answers costs one time limit, not a stuck task. Once the answer is in,
    the call has succeeded: a connection that then fails to close (a grpcio
    server shutting down sends GOAWAY and a PING, which purerpc's h2 state
    machine refuses with a ProtocolError) costs a debug line, not a call made
    again. Cancelled while such an error is raised, only the cancellation
    goes on: the error would otherwise end the caller's nursery (a coordinator
    stopped while a webserver shuts down would exit with a ProtocolError).
    """
    answers: list[T] = []
    try:
        with trio.fail_after(seconds):
            async with dial(address, ssl_context) as channel:
                answers.append(await call(channel))
    except trio.TooSlowError:
        if not answers:
            raise TimeoutError(f"no answer within {seconds:g} s") from None
        log.debug("%s: closing the connection after the answer took over %g s", address, seconds)
    except Exception as error:
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller gets Cancelled
        if not answers and isinstance(error, ExceptionGroup):
            raise first_cause(error) from error  # the group's own text says nothing
        if not answers:
            raise
        log.debug("%s: closing the connection after the answer failed: %r", address, error)
    except BaseExceptionGroup as group:
        cancelled = group.subgroup(trio.Cancelled)
        if cancelled is None or cancelled is group:
            raise
        raise cancelled from None
    return answers[0]
