"""A purerpc server bound to one address, without ``SO_REUSEPORT``, for untrusted peers.

purerpc's stock ``Server`` listens on every interface with ``SO_REUSEPORT``:
a second coordinator started by mistake would silently share the port with
the first and split the round between them, and there is no way to choose
the interface. We bind the listener ourselves (``SO_REUSEADDR`` only, which
on Linux still refuses a port another socket listens on), admit each
connection through a :class:`~..connections.Gate` (a cap that makes room by
closing the least recently active connection, shedding when descriptors run
out), finish TLS within the handshake
timeout when given a context, and serve the connection with our own driver
of purerpc's protocol objects (:mod:`.connection`: message size limit, idle
timeout, resets and closed sockets honoured at once). Authentication, when
asked for, wraps the services themselves (:mod:`.auth`), so it covers every
service served.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Sequence

import anyio
import anyio.abc
import purerpc
import trio
from anyio.streams.tls import TLSStream
from purerpc.grpc_socket import SocketWrapper

from ..connections import ConnectionLimits, Gate, Slot
from ..errors import ListenError
from ..log_throttle import Throttle
from ..logs import log_context
from ..plaintext_refusal import plaintext_refusal
from ..untrusted_text import shown
from .auth import Guard, guard_services
from .connection import GrpcServer
from .request_limits import RequestLimits

__all__ = ["serve_grpc"]

log = logging.getLogger(__name__)

#: gRPC's own default limit for received messages.
_DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_DEFAULT_MAX_BUFFERED_BYTES = 64 * 1024 * 1024


def _peer(stream: anyio.abc.ByteStream) -> str:
    try:
        host, port = stream.extra(anyio.abc.SocketAttribute.remote_address)[:2]
    except (anyio.TypedAttributeLookupError, TypeError, ValueError):
        return "?"
    return f"{host}:{port}"


#: After the answer to a plaintext HTTP request, what is read and dropped at most (bytes,
#: seconds) before the socket closes: closed with unread bytes, it would be reset, and the
#: answer might be lost.
_LINGER = (65536, 2.0)


async def _refuse_plaintext(stream: anyio.abc.ByteStream, answer: bytes) -> None:
    """Send ``answer`` in plaintext, then linger (:data:`_LINGER`). A peer gone meanwhile
    ends it quietly (a reset: anyio's trio backend raises the socket's own OSError from
    ``send_eof``, ENOTCONN)."""
    most, seconds = _LINGER
    with (
        contextlib.suppress(
            anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError
        ),
        trio.move_on_after(seconds),
    ):
        await stream.send(answer)
        await stream.send_eof()
        while most > 0:
            most -= len(await stream.receive(most))


async def _tls(
    stream: anyio.abc.ByteStream,
    context: ssl.SSLContext,
    limits: ConnectionLimits,
    throttle: Throttle,
    peer: str,
    plaintext_answer: bytes,
) -> TLSStream | None:
    """``stream`` after a TLS handshake of at most ``HANDSHAKE_TIMEOUT``; None if it failed.

    A plaintext client, a client without the required certificate or a port
    scanner are expected on a shared network: one throttled line, no traceback.
    A plaintext HTTP request is answered ``plaintext_answer`` (within a linger's
    bound, :data:`_LINGER`, after the handshake's).
    """
    plaintext = False
    with trio.move_on_after(limits.handshake_timeout):
        try:
            # standard_compatible=False: gRPC peers close without TLS close_notify.
            return await TLSStream.wrap(
                stream, server_side=True, ssl_context=context, standard_compatible=False
            )
        except Exception as error:
            cause = error.__cause__ or error
            reason = getattr(cause, "reason", None) or str(cause) or type(cause).__name__
            plaintext = reason == "HTTP_REQUEST"  # OpenSSL's name for a plaintext GET, POST...
            if not plaintext:
                throttle.warning(
                    "TLS handshake failed", "TLS handshake with %s failed: %s", peer, shown(reason)
                )
                return None
    if plaintext:
        throttle.warning(
            "plaintext requests on the TLS gRPC port",
            "plaintext HTTP request on the TLS gRPC port from %s: answered HTTP 400",
            peer,
        )
        await _refuse_plaintext(stream, plaintext_answer)
        return None
    throttle.log(
        logging.INFO,
        "TLS handshake not completed in time",
        "TLS handshake with %s not completed within %g s; connection closed",
        peer,
        limits.handshake_timeout,
    )
    return None


async def serve_grpc(
    services: Sequence[purerpc.Service],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    guard: Guard | None = None,
    max_message_bytes: int = _DEFAULT_MAX_MESSAGE_BYTES,
    max_buffered_bytes: int = _DEFAULT_MAX_BUFFERED_BYTES,
    request_limits: RequestLimits | None = None,
    limits: ConnectionLimits | None = None,
    elsewhere: str = "",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``services`` on ``host:port``; ``task_status.started`` gets the bound port.

    ``ssl_context`` turns on TLS (a plaintext HTTP request is then answered HTTP 400,
    "this port speaks gRPC over TLS", followed by ``elsewhere``: where what its client
    looked for is); ``guard`` runs on the headers of every call
    before its handler (see :mod:`.auth`) and may refuse it.
    ``max_buffered_bytes`` bounds what all connections together hold of
    requests not read yet (see :mod:`.read_budget`); ``request_limits``, the
    request message of the methods it names (see :mod:`.request_limits`). ``limits`` bound
    the connections (by default without idle timeout: a server whose calls
    may be quiet for long, like a selector holding clients, keeps them).
    """
    limits = limits or ConnectionLimits()
    try:
        tcp = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as error:
        raise ListenError("PORT", host, port, error) from None
    if guard is not None:
        services = guard_services(services, guard)
    bound = tcp.extra(anyio.abc.SocketAttribute.local_port)
    throttle = Throttle(log)
    plaintext_answer = plaintext_refusal(
        f"this port speaks gRPC over TLS{', ' if elsewhere else ''}{elsewhere}"
    )
    server = GrpcServer(
        services,
        max_message_bytes=max_message_bytes,
        max_buffered_bytes=max_buffered_bytes,
        request_limits=request_limits,
        idle_timeout=limits.idle_timeout,
        throttle=throttle,
    )
    gate = Gate[anyio.abc.SocketStream](
        f"gRPC port {bound}",
        limits,
        make_room=True,
        throttle=throttle,
    )

    async def handle(stream: anyio.abc.SocketStream, slot: Slot) -> None:
        peer = _peer(stream)
        with log_context(peer=peer):
            SocketWrapper._set_socket_options(stream)  # keep-alive probes, no Nagle delay
            connection: anyio.abc.ByteStream | None = stream
            if ssl_context is not None:
                connection = await _tls(
                    stream, ssl_context, limits, throttle, peer, plaintext_answer
                )
            if connection is not None:
                await server.serve_connection(connection, slot, peer)

    async with tcp:
        task_status.started(bound)
        await gate.serve(
            [listener.accept for listener in tcp.listeners], anyio.aclose_forcefully, handle
        )
