"""The websocket status stream for the webserver: ``ws://HOST:STATUS_PORT/status``.

Each subscriber gets the current status, then one JSON text message per
change, from its own :class:`~.status.Subscription`. A subscriber that does
not take a message within :data:`_SEND_TIMEOUT` seconds (its TCP buffers are
full: it stopped reading) is disconnected, so a stuck peer holds no resources
for long; it only ever delays itself.

Only the webserver should watch: with a token set, the handshake must carry
``Authorization: Bearer <token>`` or it is answered HTTP 401 before the
upgrade. The number of subscribers is capped (HTTP 503 beyond it), and as
subscribers have nothing to say, a message larger than a few bytes closes
the connection (code 1009).
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
)

from ..errors import ListenError
from ..rpc.auth import AUTHORIZATION, bearer_problem, header_value
from .hub import StatusHub, Subscription

__all__ = ["PATH", "StatusLimits", "StatusServer"]

log = logging.getLogger(__name__)

PATH = "/status"
_SEND_TIMEOUT = 10.0


#: WebSocket close code of a message larger than the server accepts (RFC 6455).
_MESSAGE_TOO_BIG = 1009


@dataclass(frozen=True)
class StatusLimits:
    """Who may subscribe and how much they may cost (see STATUS_* keys)."""

    token: str = field(default="", repr=False)  # empty: anyone may subscribe
    max_subscribers: int = 0  # 0: no limit
    max_message_bytes: int = 4096  # what one subscriber may send in one message


async def _drain(ws: WebSocketConnection, peer: str) -> None:
    """Read (and ignore) what the subscriber sends; return when it goes away."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as closed:
        if closed.reason is not None and closed.reason.code == _MESSAGE_TOO_BIG:
            log.warning(
                "status subscriber %s sent a message larger than STATUS_MAX_MESSAGE_BYTES; "
                "disconnected",
                peer,
            )
        return


async def _push(ws: WebSocketConnection, subscription: Subscription, peer: str) -> None:
    # One cancel scope for the connection, its deadline armed only while a send is
    # under way: a scope per message cost a tenth of the fan-out (bench --parts fanout).
    with trio.CancelScope() as sending:
        while True:
            published = await subscription.next()
            sending.deadline = trio.current_time() + _SEND_TIMEOUT
            await ws.send_message(published.text)
            sending.deadline = math.inf
    if sending.cancelled_caught:
        log.warning(
            "status subscriber %s stopped reading for %.0f s; disconnecting it",
            peer,
            _SEND_TIMEOUT,
        )


async def _until_first(
    nursery: trio.Nursery, job: Callable[..., Awaitable[None]], *args: Any
) -> None:
    await job(*args)
    nursery.cancel_scope.cancel()


def _peer(request: WebSocketRequest) -> str:
    remote = request.remote
    return f"{remote.address}:{remote.port}" if hasattr(remote, "port") else "?"


class StatusServer:
    """Serves the hub's messages to websocket subscribers."""

    def __init__(
        self,
        hub: StatusHub,
        limits: StatusLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._hub = hub
        self._limits = limits or StatusLimits()
        self._ssl_context = ssl_context
        self._connections = 0  # accepted or being accepted (the cap counts both)

    @property
    def connected(self) -> int:
        """Subscribers connected now, or being accepted (read by the metrics)."""
        return self._connections

    def _refusal(self, request: WebSocketRequest) -> tuple[int, str] | None:
        """The HTTP status and reason to refuse a handshake with, or None to accept it."""
        if request.path != PATH:
            return 404, f"the status stream is at {PATH}"
        if self._limits.token:
            authorization = header_value(request.headers, AUTHORIZATION)
            problem = bearer_problem(authorization, self._limits.token)
            if problem is not None:
                return 401, f"unauthorized: {problem}"
        cap = self._limits.max_subscribers
        if cap and self._connections >= cap:
            return 503, f"too many subscribers (MAX_STATUS_SUBSCRIBERS={cap})"
        return None

    async def handle(self, request: WebSocketRequest) -> None:
        refusal = self._refusal(request)
        if refusal is not None:
            code, reason = refusal
            if code != 404:
                log.warning("refused status subscriber %s: %s", _peer(request), reason)
            headers = [(b"www-authenticate", b"Bearer")] if code == 401 else None
            await request.reject(code, extra_headers=headers, body=f"{reason}\n".encode())
            return
        self._connections += 1
        try:
            await self._serve(request)
        finally:
            self._connections -= 1

    async def _serve(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        peer = _peer(request)
        log.info("status subscriber %s connected", peer)
        try:
            with self._hub.subscribe() as subscription:
                async with trio.open_nursery() as nursery:
                    # Whichever ends first ends both: a subscriber that went away
                    # (or talked too much) does not wait for the next change.
                    nursery.start_soon(_until_first, nursery, _drain, ws, peer)
                    await _until_first(nursery, _push, ws, subscription, peer)
                if subscription.dropped:
                    log.info(
                        "status subscriber %s missed %d message(s) while slow",
                        peer,
                        subscription.dropped,
                    )
        except ConnectionClosed:
            pass
        finally:
            await ws.aclose()
            log.info("status subscriber %s disconnected", peer)

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port``; ``task_status.started`` gets the bound port."""
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as error:
            raise ListenError("STATUS_PORT", host, port, error) from None
        if self._ssl_context is not None:
            listeners = [
                trio.SSLListener(listener, self._ssl_context, https_compatible=True)
                for listener in listeners
            ]
        server = WebSocketServer(
            self.handle, listeners, max_message_size=self._limits.max_message_bytes
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            task_status.started(server.port)
