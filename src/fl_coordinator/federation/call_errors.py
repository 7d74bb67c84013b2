"""Why a call to a peer failed, in one line an operator can act on.

The reference selector calls its coordinator and the reference client its
selector. What reaches them when a call fails is whatever the layers below
raised: anyio's ``OSError("All connection attempts failed")`` (the address
is only in its cause), purerpc's ``RpcFailedError`` inside an exception
group of its channel, an ``ssl.SSLError``, a lost connection. :func:`explain`
turns each into one line that names the peer, its address, what happened
and what to check; :func:`is_mistake` says whether it is a mistake of the
settings (a wrong port, token or TLS setting: retrying cannot help) rather
than a peer that is not there yet.
"""

from __future__ import annotations

import errno
import socket
import ssl

import trio
from purerpc.grpclib.exceptions import RpcFailedError
from purerpc.grpclib.status import StatusCode

from ..untrusted_text import shown
from .link import LinkLost

__all__ = ["explain", "innermost", "is_mistake", "rpc_status"]

#: Longest text quoted from a peer (its status details, its first bytes).
_QUOTED = 120
#: The type of an HTTP/2 SETTINGS frame, the first frame of every HTTP/2 server (RFC 9113, 3.4).
_SETTINGS = b"\x04"


def innermost(error: BaseException) -> BaseException:
    """The first leaf of an exception group (purerpc and trio wrap what their tasks raise);
    an OSError's cause where anyio put the real one (``All connection attempts failed``)."""
    while True:
        if isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        elif (
            type(error) is OSError and error.errno is None and isinstance(error.__cause__, OSError)
        ):
            error = error.__cause__
        else:
            return error


def rpc_status(error: BaseException) -> StatusCode | None:
    """The gRPC status code of the peer's answer, if ``error`` is one."""
    error = innermost(error)
    return error.status.status_code if isinstance(error, RpcFailedError) else None


def _answered_by(first: bytes) -> str | None:
    """What kind of server sent ``first`` (the first bytes it answered an HTTP/2 preface with)."""
    if first.startswith(b"HTTP/"):
        line = first.split(b"\r\n", 1)[0].decode("ascii", "replace")
        return f"answered in HTTP/1 ({shown(line, _QUOTED)}), not gRPC"
    if first[:1] == b"\x15":  # a TLS alert record: it expected a TLS handshake
        return "answered with a TLS alert: it speaks TLS, and this call was plaintext"
    if first[3:4] == _SETTINGS and first[5:9] == b"\x00\x00\x00\x00":
        return None  # an HTTP/2 server's preface (SETTINGS on stream 0): it went away
    if first:
        return f"answered with bytes that are not HTTP/2 ({shown(first, _QUOTED)})"
    return None


def explain(
    error: BaseException, address: str, peer: str, port_hint: str = "", tls_hint: str = ""
) -> str:
    """One line: the ``peer`` at ``address`` could not be called, why, what to check.

    ``port_hint`` is appended where the address may be the wrong port
    ("selectors call the coordinator's PORT, 50050 by default"); ``tls_hint``
    where a connection closed before the peer sent a byte, which is what a TLS
    server does to a plaintext call (it sends no alert: no TLS version was agreed),
    so give it for plaintext calls ("if it serves TLS, give --selector-ca").
    """
    cause = innermost(error)
    where = f"the {peer} at {address}"
    hint = f" ({port_hint})" if port_hint else ""
    if isinstance(cause, RpcFailedError):
        status = cause.status
        details = shown(status.status_message or "", _QUOTED)
        line = f"{where} refused the call: {status.status_code.name} ({details})"
        if status.status_code is StatusCode.UNAUTHENTICATED:
            line += ": give it the problem's token (AUTH_TOKEN, AUTH_TOKEN_FILE or --token-file)"
        elif status.status_code is StatusCode.UNIMPLEMENTED:
            line += f": is it a {peer}?{hint}"
        return line
    if isinstance(cause, LinkLost):
        kind = _answered_by(cause.answered)
        if kind is not None:
            return f"{where} {kind}: is that its gRPC port?{hint}"
        if tls_hint and not cause.answered:
            return f"{where} closed the connection before answering: {tls_hint}"
        return f"{where} closed the connection before answering"
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or cause.strerror or str(cause)
        return f"TLS with {where} failed ({reason}): check its certificate and the CA given"
    if isinstance(cause, trio.TooSlowError):
        return f"{where} did not answer in time"
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve {address} ({cause.strerror})"
    if isinstance(cause, OSError):
        reason = cause.strerror or str(cause)
        if cause.errno == errno.ECONNREFUSED:
            return f"nothing listens at {address} (connection refused): is the {peer} up?{hint}"
        return f"cannot reach {where} ({reason})"
    return f"{where} could not be called ({shown(str(cause) or type(cause).__name__, _QUOTED)})"


def is_mistake(error: BaseException) -> bool:
    """A setting is wrong (retrying will not help): the token, TLS, or not a gRPC port."""
    cause = innermost(error)
    if isinstance(cause, RpcFailedError):
        return cause.status.status_code in (
            StatusCode.UNAUTHENTICATED,
            StatusCode.PERMISSION_DENIED,
        )
    if isinstance(cause, LinkLost):
        return _answered_by(cause.answered) is not None
    return isinstance(cause, ssl.SSLError)
