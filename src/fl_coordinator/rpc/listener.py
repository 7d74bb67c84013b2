"""A purerpc server bound to one address, without ``SO_REUSEPORT``, optionally over TLS.

purerpc's stock ``Server`` listens on every interface with ``SO_REUSEPORT``:
a second coordinator started by mistake would silently share the port with
the first and split the round between them, and there is no way to choose
the interface. We bind the listener ourselves (``SO_REUSEADDR`` only, which
on Linux still refuses a port another socket listens on), wrap it in TLS when
given a context, and hand each connection to purerpc's connection handler,
configured with our message size limit. Authentication, when asked for, wraps
the services themselves (:mod:`.auth`), so it covers every service served.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

import anyio
import anyio.abc
import purerpc
import trio
from anyio.streams.tls import TLSListener
from h2.errors import ErrorCodes
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.exceptions import MessageTooLargeError
from purerpc.server import ConnectionHandler

from ..errors import ListenError
from .auth import Guard, guard_services

__all__ = ["serve_grpc"]

log = logging.getLogger(__name__)

#: gRPC's own default limit for received messages.
_DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def _peer(stream: anyio.abc.ByteStream) -> str:
    try:
        host, port = stream.extra(anyio.abc.SocketAttribute.remote_address)[:2]
    except (anyio.TypedAttributeLookupError, TypeError, ValueError):
        return "?"
    return f"{host}:{port}"


class _Counters:
    """What purerpc's ConnectionHandler expects of its server: two counters."""

    _connection_count = 0
    _exception_count = 0


class _Handler(ConnectionHandler):
    """purerpc's dispatch, with our message size limit and a clear line when it is exceeded.

    purerpc checks the size in the 5-byte gRPC prefix, before buffering the
    message, and then gives up on the whole connection: we log who sent it,
    tell the peer why in the HTTP/2 GOAWAY (grpcio shows it in the error's
    details) and close that connection; the server goes on serving the others.
    """

    def __init__(self, services: Sequence[purerpc.Service], max_message_bytes: int) -> None:
        super().__init__({s.name: s for s in services}, _Counters())
        self.config = GRPCConfiguration(client_side=False, max_message_length=max_message_bytes)
        self._max_message_bytes = max_message_bytes

    async def __call__(self, stream: anyio.abc.SocketStream) -> None:
        peer = _peer(stream)
        try:
            async with (
                stream,  # closed when we are done with it, whatever happened
                GRPCProtoSocket(self.config, stream) as grpc_socket,
            ):
                try:
                    async with anyio.create_task_group() as task_group:
                        async for request in grpc_socket.listen():
                            task_group.start_soon(self.request_received, request)
                except* MessageTooLargeError:
                    log.warning(
                        "refused a gRPC message larger than GRPC_MAX_MESSAGE_BYTES=%d from %s; "
                        "connection closed",
                        self._max_message_bytes,
                        peer,
                    )
                    self._go_away(grpc_socket)
        except* Exception as group:
            # A peer that went away mid-call, a protocol error: that connection only.
            log.debug("gRPC connection from %s ended: %r", peer, group.exceptions[0])

    def _go_away(self, grpc_socket: GRPCProtoSocket) -> None:
        """Tell the peer why its connection closes (HTTP/2 GOAWAY, sent as the socket closes).

        Uses purerpc internals (pinned at 0.8.0): it has no API to close a
        connection with a reason.
        """
        reason = f"message larger than the server's limit of {self._max_message_bytes} bytes"
        h2 = grpc_socket._grpc_connection.h2_connection
        h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, additional_data=reason.encode())


class _QuietTLSListener(TLSListener):
    """A TLS listener whose failed handshakes are one warning line, not a traceback.

    A plaintext client, a client without the required certificate or a port
    scanner are expected on a shared network; what to log is who and why.
    """

    @staticmethod
    async def handle_handshake_error(exc: BaseException, stream: anyio.abc.AnyByteStream) -> None:
        peer = _peer(stream)
        await anyio.aclose_forcefully(stream)
        if isinstance(exc, anyio.get_cancelled_exc_class()) or not isinstance(exc, Exception):
            raise exc
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        log.warning("TLS handshake with %s failed: %s", peer, reason)


async def serve_grpc(
    services: Sequence[purerpc.Service],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    guard: Guard | None = None,
    max_message_bytes: int = _DEFAULT_MAX_MESSAGE_BYTES,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``services`` on ``host:port``; ``task_status.started`` gets the bound port.

    ``ssl_context`` turns on TLS; ``guard`` runs on the headers of every call
    before its handler (see :mod:`.auth`) and may refuse it.
    """
    try:
        tcp = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as error:
        raise ListenError("PORT", host, port, error) from None
    listener: anyio.abc.Listener[anyio.abc.ByteStream] = tcp
    if ssl_context is not None:
        # standard_compatible=False: gRPC peers close without TLS close_notify.
        listener = _QuietTLSListener(tcp, ssl_context, standard_compatible=False)
    if guard is not None:
        services = guard_services(services, guard)
    async with listener:
        task_status.started(tcp.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(_Handler(services, max_message_bytes))
