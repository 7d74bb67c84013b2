"""Bearer-token authentication of gRPC calls, for every service a server hosts.

The check wraps each method handler of each :class:`purerpc.Service` handed to
the server, so a service added later (another servicer on the same port) is
covered without knowing about it; only the services named in
``open_services`` (the health check, which Kubernetes probes call without a
token) are left open. A refused call fails with UNAUTHENTICATED before the
servicer runs, so it changes nothing and publishes nothing.

The token is compared with :func:`hmac.compare_digest` (constant time) and is
never logged or echoed: neither the expected one nor the one presented.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import purerpc
from purerpc.grpclib.events import RequestReceived
from purerpc.rpc import Cardinality
from purerpc.server import BoundRPCMethod

from ..config import Settings, check_not_placeholder, optional_token
from ..errors import ConfigError
from ..log_throttle import Throttle
from ..logs import context_field
from .health import SERVICE_NAME as HEALTH_SERVICE

__all__ = [
    "AUTHORIZATION",
    "Guard",
    "TokenGuard",
    "bearer_problem",
    "guard_services",
    "header_value",
    "load_token",
]

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
_SCHEME = "bearer"


def load_token(settings: Settings) -> str:
    """The selectors' token: AUTH_TOKEN, or the first line of AUTH_TOKEN_FILE ("" = none).

    A file lets the secret come from a mounted Kubernetes secret instead of the
    environment, which other processes of the same user can read.
    """
    if not settings.auth_token_file:
        return settings.auth_token
    path = Path(settings.auth_token_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        expected = f"a readable text file ({reason})"
        raise ConfigError("AUTH_TOKEN_FILE", str(path), expected) from None
    first = lines[0].strip() if lines else ""
    try:
        token = optional_token(first)
    except ValueError:
        token = ""
    if not token:
        raise ConfigError(
            "AUTH_TOKEN_FILE", str(path), "a first line of printable ASCII without spaces"
        )
    check_not_placeholder(f"AUTH_TOKEN_FILE ({path})", token)
    return token


def header_value(headers: Iterable[tuple[bytes | str, bytes | str]], name: str) -> str | None:
    """The first value of header ``name`` (lower case) as text, None if absent.

    For gRPC metadata and websocket handshake headers alike: both are pairs,
    of bytes or text depending on the library.
    """
    for key, value in headers:
        key_text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        if key_text.lower() == name:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


def bearer_problem(header: str | None, token: str) -> str | None:
    """Why ``header`` (an ``authorization`` value) does not carry ``token``, or None if it does."""
    if header is None:
        return "no authorization metadata"
    scheme, _, presented = header.strip().partition(" ")
    if scheme.lower() != _SCHEME or not presented.strip():
        return "authorization metadata is not 'Bearer <token>'"
    if not hmac.compare_digest(presented.strip().encode(), token.encode()):
        return "wrong token"
    return None


@dataclass(frozen=True)
class TokenGuard:
    """Requires ``authorization: Bearer <token>`` on every call but those to ``open_services``.

    Refusals are logged through :attr:`throttle` (once per interval and peer,
    with a count): whoever runs the guard runs ``throttle.run``.
    """

    token: str = field(repr=False)
    open_services: frozenset[str] = frozenset({HEALTH_SERVICE})
    throttle: Throttle = field(default_factory=lambda: Throttle(log), repr=False, compare=False)

    def __call__(self, request: RequestReceived) -> None:
        """Raise UNAUTHENTICATED unless the call carries the token."""
        if request.service_name in self.open_services:
            return
        problem = bearer_problem(header_value(request.custom_metadata, AUTHORIZATION), self.token)
        if problem is None:
            return
        self.throttle.warning(
            "refused calls without the token",
            "refused a call to /%s/%s: %s (from %s)",
            request.service_name,
            request.method_name,
            problem,
            context_field("peer") or "?",
        )
        raise purerpc.RpcFailedError(
            purerpc.Status(purerpc.StatusCode.UNAUTHENTICATED, f"unauthenticated: {problem}")
        )


#: Runs on the headers of every call before its handler; raises RpcFailedError to refuse it.
Guard = Callable[[RequestReceived], None]


def _guard_method(bound: BoundRPCMethod, guard: Guard) -> BoundRPCMethod:
    """``bound`` with ``guard`` run on the call's headers before the handler starts."""
    handler = bound.method_fn
    cardinality = bound.signature.cardinality

    if cardinality in (Cardinality.UNARY_STREAM, Cardinality.STREAM_STREAM):

        async def streaming(arg: Any, request: RequestReceived) -> AsyncIterator[Any]:
            guard(request)
            async with aclosing(handler(arg, request=request)) as responses:
                async for response in responses:
                    yield response

        return BoundRPCMethod(streaming, bound.signature)

    async def unary(arg: Any, request: RequestReceived) -> Any:
        guard(request)
        return await handler(arg, request=request)

    return BoundRPCMethod(unary, bound.signature)


def guard_services(services: Sequence[purerpc.Service], guard: Guard) -> list[purerpc.Service]:
    """Copies of ``services`` whose every method runs ``guard`` first (originals untouched)."""
    guarded = []
    for service in services:
        copy = purerpc.Service(service.name)
        copy.methods = {
            name: _guard_method(bound, guard) for name, bound in service.methods.items()
        }
        guarded.append(copy)
    return guarded
