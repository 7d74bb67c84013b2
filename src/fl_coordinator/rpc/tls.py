"""TLS contexts for gRPC (server and client side) and the status websocket.

Built once at start-up from file paths, so an unreadable certificate or a key
that does not match it stops the program with one clear line (a ConfigError)
instead of failing on the first handshake. gRPC peers (grpcio, grpc-go)
refuse a TLS server that does not negotiate HTTP/2 by ALPN, so every context
here offers ``h2``; the websocket context does not, as it speaks HTTP/1.1.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from pathlib import Path

from ..config import Settings
from ..errors import ConfigError

__all__ = [
    "Names",
    "client_context",
    "grpc_server_context",
    "selector_client_context",
    "server_context",
    "status_server_context",
    "warn_if_exposed",
]

log = logging.getLogger(__name__)

_ALPN_H2 = ["h2"]


#: The names of a certificate and its key in error messages (config keys or CLI flags).
Names = tuple[str, str]
_KEY_NAMES: Names = ("TLS_CERT_FILE", "TLS_KEY_FILE")


def _load_chain(context: ssl.SSLContext, cert: str, key: str, names: Names) -> None:
    for name, path in zip(names, (cert, key), strict=True):
        if not Path(path).is_file():
            raise ConfigError(name, path, "a readable PEM file")
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            names[0], cert, f"a PEM certificate matching its key ({_reason(error)})"
        ) from None


def _load_ca(context: ssl.SSLContext, key: str, path: str) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(key, path, f"a readable PEM CA bundle ({_reason(error)})") from None


def _reason(error: Exception) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def server_context(
    cert: str,
    key: str,
    client_ca: str = "",
    *,
    alpn: list[str] | None = _ALPN_H2,
    names: Names = _KEY_NAMES,
    ca_name: str = "TLS_CLIENT_CA_FILE",
) -> ssl.SSLContext:
    """A server context; with ``client_ca``, clients must present a certificate from it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key, names)
    if client_ca:
        _load_ca(context, ca_name, client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def client_context(
    ca: str,
    cert: str = "",
    key: str = "",
    *,
    ca_name: str = "TLS_SELECTOR_CA_FILE",
    names: Names = _KEY_NAMES,
) -> ssl.SSLContext:
    """A client context that trusts ``ca`` (and presents ``cert``/``key`` for mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(context, ca_name, ca)
    if cert:
        _load_chain(context, cert, key, names)
    context.set_alpn_protocols(_ALPN_H2)
    return context


def grpc_server_context(settings: Settings) -> ssl.SSLContext | None:
    """The gRPC server's context, or None for plaintext."""
    if not settings.tls_cert_file:
        return None
    return server_context(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    )


def status_server_context(settings: Settings) -> ssl.SSLContext | None:
    """The status websocket's context (``wss``), or None for plaintext.

    The webserver is not asked for a client certificate: it authenticates with
    STATUS_TOKEN, and TLS_CLIENT_CA_FILE is the CA of the selectors.
    """
    if not settings.tls_cert_file:
        return None
    return server_context(settings.tls_cert_file, settings.tls_key_file, alpn=None)


def selector_client_context(settings: Settings) -> ssl.SSLContext | None:
    """The context of GoalCountReached calls, or None for plaintext.

    With TLS_CERT_FILE set, the coordinator presents its own certificate too, so
    selectors that require mutual TLS can check who tells them to configure.
    """
    if not settings.tls_selector_ca_file:
        return None
    return client_context(
        settings.tls_selector_ca_file, settings.tls_cert_file, settings.tls_key_file
    )


def _is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (a listen address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(what: str, host: str, context: ssl.SSLContext | None) -> None:
    """Plaintext is fine on loopback; anywhere else, say so once at start-up."""
    if context is None and not _is_loopback(host):
        log.warning(
            "%s listens on %s without TLS: anyone on the network can read and inject "
            "traffic (set TLS_CERT_FILE and TLS_KEY_FILE)",
            what,
            host,
        )
