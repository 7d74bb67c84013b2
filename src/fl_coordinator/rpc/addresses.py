"""Selector addresses: parsing ids as ``host:port`` and dialing them."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

import anyio.abc
import purerpc
import trio

from ..errors import BadAddress

__all__ = ["dial", "socket_stream", "split_address"]


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; raise BadAddress."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
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
