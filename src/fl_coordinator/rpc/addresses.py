"""Selector addresses: parsing ids as ``host:port`` and dialing them."""

from __future__ import annotations

import ssl

import purerpc

from ..errors import BadAddress

__all__ = ["dial", "split_address"]


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


def dial(address: str, ssl_context: ssl.SSLContext | None = None) -> purerpc.Channel:
    """A purerpc channel to ``host:port`` (not yet connected): over TLS with ``ssl_context``.

    With TLS the peer's certificate must name the address's host (an IP
    address or a DNS name).
    """
    host, port = split_address(address)
    if ssl_context is None:
        return purerpc.insecure_channel(host, port)
    return purerpc.secure_channel(host, port, ssl_context)
