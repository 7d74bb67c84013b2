"""Addresses: parsing selector ids as ``host:port``, dialing them, explaining bind failures."""

from __future__ import annotations

import errno
import ssl

import purerpc

from ..config import ConfigError


class BadAddress(ValueError):
    """A selector id that cannot be dialed."""


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; raise BadAddress."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
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


def bind_error(key: str, host: str, port: int, error: OSError) -> ConfigError:
    """A start-up error for a port we could not listen on."""
    if error.errno == errno.EADDRINUSE:
        reason = "a free port (address already in use: is another coordinator running?)"
    elif error.errno == errno.EADDRNOTAVAIL:
        reason = f"a port on a local address ({host!r} is not an address of this machine)"
    else:
        reason = f"a port we may listen on at {host!r} ({error.strerror or error})"
    return ConfigError(key, port, reason)
