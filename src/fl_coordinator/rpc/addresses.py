"""Peer addresses (selector ids, the legacy webserver): parsing ``host:port``, dialing, calling."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio.abc
import purerpc
import trio

from ..errors import BadAddress

__all__ = ["call_once", "dial", "socket_stream", "split_address"]

log = logging.getLogger(__name__)

T = TypeVar("T")


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


@contextlib.asynccontextmanager
async def dial(
    address: str, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[purerpc.Channel]:
    """A purerpc channel connected to ``host:port``: over TLS with ``ssl_context``.

    With TLS the peer's certificate must name the address's host (an IP
    address or a DNS name). Leaving the context closes the connection's
    socket: purerpc's channel leaves that to the garbage collector, so a
    process that dials often would hold one descriptor per past call.
    """
    host, port = split_address(address)
    if ssl_context is None:
        channel = purerpc.insecure_channel(host, port)
    else:
        channel = purerpc.secure_channel(host, port, ssl_context)
    try:
        async with channel:
            yield channel
    finally:
        if channel._grpc_socket is not None:  # connected
            with trio.CancelScope(shield=True):
                await socket_stream(channel).aclose()


def socket_stream(channel: purerpc.Channel) -> anyio.abc.SocketStream:
    """The socket stream under a connected purerpc ``channel`` (purerpc does not expose it)."""
    return channel._grpc_socket._socket._stream  # type: ignore[no-any-return]


async def call_once(
    address: str,
    call: Callable[[purerpc.Channel], Awaitable[T]],
    *,
    seconds: float,
    ssl_context: ssl.SSLContext | None = None,
) -> T:
    """``call(channel)`` on a connection of its own to ``address``, closed after it.

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
        if not answers:
            raise
        log.debug("%s: closing the connection after the answer failed: %r", address, error)
    except BaseExceptionGroup as group:
        cancelled = group.subgroup(trio.Cancelled)
        if cancelled is None or cancelled is group:
            raise
        raise cancelled from None
    return answers[0]
