"""One gRPC connection to a peer, shared by every call, dialled again when gone.

The reference selector calls its coordinator, and the reference client its
selector, through a :class:`GrpcLink`. The Go selector dials the coordinator
for every call and never closes the connection: one descriptor lost per
client on both sides. A link keeps one HTTP/2 connection, on which
concurrent calls are multiplexed (at most :data:`MAX_CONCURRENT_CALLS`, below
the coordinator's 100 streams per connection), and dials a new one when the
last is gone:

* the peer closed it (idle: GOAWAY; restarted: end of stream) or it broke:
  calls in flight on it fail at once with :class:`LinkLost` instead of
  waiting out their time limit (purerpc's client would wait for ever), and
  the next call dials;
* it sat unused for :data:`IDLE_CLOSE` seconds: the link closes it itself,
  before the coordinator's ``IDLE_CONNECTION_TIMEOUT`` (30 s by default)
  does, so a call never races the coordinator's GOAWAY.

A peer that is not a gRPC server (the coordinator's status port, an HTTP/1.1
server, a TLS server dialled in plaintext) answers the HTTP/2 preface with
something else and closes: :class:`LinkLost` carries the first bytes it sent,
so the caller can say what listens there (:mod:`.call_errors`).

A failed call is not retried: a check-in the coordinator may have counted
must not be counted twice. The caller decides (a client is told to come back).

purerpc's client channel is a connection plus two names; the generated stubs
only read ``_grpc_socket``, ``_host`` and ``_port`` of it, so a
:class:`_Connection` stands in for one, over a stream that tells when it ends.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.abc
import trio
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.exceptions import RpcFailedError

from ..rpc.addresses import (
    WatchedStream,
    answer_socket,
    connect,
    first_cause,
    refuses_streams,
    split_address,
)

__all__ = ["IDLE_CLOSE", "MAX_CONCURRENT_CALLS", "GrpcLink", "LinkLost"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Calls in flight at once on the connection.
MAX_CONCURRENT_CALLS = 64
#: Seconds without calls after which the selector closes the connection itself.
IDLE_CLOSE = 20.0


class LinkLost(trio.BrokenResourceError):
    """The connection ended before the call was answered.

    ``answered``: the first bytes the peer ever sent on it (``b""``: none),
    which tell a gRPC server that went away from something else listening
    there (``b"HTTP/1.1 400"``: an HTTP/1 server; ``b"\\x15\\x03"``: a TLS alert).
    """

    def __init__(self, message: str, answered: bytes = b"") -> None:
        super().__init__(message)
        self.answered = answered


def _answered(error: BaseException) -> bool:
    """Is ``error`` the peer's answer (a gRPC status), so the connection is fine?"""
    if isinstance(error, BaseExceptionGroup):
        return error.split(RpcFailedError)[1] is None
    return isinstance(error, RpcFailedError)


class _Connection:
    """One connection, standing in for a purerpc channel (see the module's docstring)."""

    def __init__(self, host: str, port: int, grpc_socket: GRPCProtoSocket, stream: WatchedStream):
        self._host = host
        self._port = port
        self._grpc_socket = grpc_socket
        self.stream = stream
        self.calls: set[trio.CancelScope] = set()
        self.idle = trio.CancelScope(deadline=trio.current_time() + IDLE_CLOSE)
        #: What ended the connection, when purerpc's reader or writer failed (an answer
        #: over the bound, a protocol error): named in the calls' LinkLost.
        self.failure: Exception | None = None

    @property
    def usable(self) -> bool:
        """Open, no GOAWAY received (h2 then refuses new streams), and not idle too long.

        A call made just as :data:`IDLE_CLOSE` runs out (a client that waited the
        selector's reconnection time, 20 s, after its last call) must not take the
        connection that is being closed: it would fail as lost.
        """
        return (
            not self.stream.ended.is_set()
            and not refuses_streams(self._grpc_socket)
            and not self.idle.cancel_called
            and trio.current_time() < self.idle.deadline
        )

    def close(self) -> None:
        """End the connection: its holder closes it, its calls fail."""
        self.stream.ended.set()


class GrpcLink:
    """Calls to the ``peer`` (a name for messages) at ``address`` over one shared connection
    (TLS with ``ssl_context``)."""

    def __init__(
        self,
        nursery: trio.Nursery,
        address: str,
        ssl_context: ssl.SSLContext | None = None,
        *,
        peer: str = "coordinator",
    ) -> None:
        self._nursery = nursery
        self._address = address
        self._ssl_context = ssl_context
        self._peer = peer
        self._connection: _Connection | None = None
        self._dialing = trio.Lock()
        self._limiter = trio.CapacityLimiter(MAX_CONCURRENT_CALLS)
        #: Connections dialled so far.
        self.dials = 0

    @property
    def connected(self) -> bool:
        """A connection is open and usable (the next call will not dial)."""
        return self._connection is not None and self._connection.usable

    async def call(self, invoke: Callable[[Any], Awaitable[T]]) -> T:
        """``await invoke(channel)``, dialling first if needed (the caller bounds the time).

        ``invoke`` makes one call with a generated stub on ``channel``
        (``Stub(channel).Method(request, metadata=...)``, or a whole
        streaming exchange). Raises what the call raised
        (``purerpc.RpcFailedError`` for the peer's answer), OSError if it
        cannot be dialled, and :class:`LinkLost` if the connection ended
        meanwhile. A call that did not end with the peer's answer (broken,
        timed out) drops the connection.
        """
        async with self._limiter:
            connection = await self._connected()
            scope = trio.CancelScope()
            connection.calls.add(scope)
            connection.idle.deadline = math.inf
            try:
                with scope:
                    return await invoke(connection)
                why = f": {connection.failure}" if connection.failure is not None else ""
                raise LinkLost(
                    f"the connection to the {self._peer} at {self._address} was lost{why}",
                    connection.stream.first_bytes,
                )
            except BaseException as error:
                if not _answered(error):
                    connection.close()  # broken, or in an unknown state: dial afresh
                raise
            finally:
                connection.calls.discard(scope)
                if not connection.calls:
                    connection.idle.deadline = trio.current_time() + IDLE_CLOSE

    async def _connected(self) -> _Connection:
        async with self._dialing:
            if self._connection is None or not self._connection.usable:
                if self._connection is not None:
                    self._connection.close()
                self._connection = await self._nursery.start(self._hold)
                self.dials += 1
            return self._connection

    async def _hold(self, *, task_status: trio.TaskStatus[_Connection]) -> None:
        """Open a connection, hand it out, close it when it ends, idles or is dropped.

        A failure to connect goes to the caller that asked for the connection;
        a failure after that (purerpc's reader or writer) only ends it.
        """
        host, port = split_address(self._address)
        stream = await connect(host, port, self._ssl_context)
        connection: _Connection | None = None
        try:
            async with answer_socket(stream) as grpc_socket:
                connection = _Connection(host, port, grpc_socket, stream)
                task_status.started(connection)
                with connection.idle:
                    await stream.ended.wait()
        except Exception as error:
            if connection is None:
                raise
            connection.failure = first_cause(error) if isinstance(error, ExceptionGroup) else error
            log.debug("connection to the %s %s ended: %r", self._peer, self._address, error)
        finally:
            if connection is not None:
                for scope in connection.calls:
                    scope.cancel()
                if self._connection is connection:
                    self._connection = None
            await anyio.aclose_forcefully(stream)
