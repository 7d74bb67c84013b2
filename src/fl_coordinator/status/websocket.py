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

Connections are accepted through a :class:`~..connections.Gate` (at most
``MAX_CONNECTIONS``, shed when descriptors run out), and the handshake (TLS,
then the HTTP upgrade) must complete within ``HANDSHAKE_TIMEOUT``:
trio-websocket's own server waits 60 s, even for a peer that has already
closed, which we notice at once.
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
    wrap_server_stream,
)

from ..connections import ConnectionLimits, Gate, Slot, serve_listeners
from ..errors import ListenError
from ..log_throttle import Throttle
from ..logs import context_field, log_context
from ..rpc.auth import AUTHORIZATION, bearer_problem, header_value
from ..untrusted_text import shown
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
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)


async def _drain(ws: WebSocketConnection, throttle: Throttle) -> None:
    """Read (and ignore) what the subscriber sends; return when it goes away."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as closed:
        if closed.reason is not None and closed.reason.code == _MESSAGE_TOO_BIG:
            throttle.warning(
                "status subscriber sent too large a message",
                "status subscriber %s sent a message larger than STATUS_MAX_MESSAGE_BYTES; "
                "disconnected",
                context_field("peer"),
            )
        return


async def _push(ws: WebSocketConnection, subscription: Subscription, throttle: Throttle) -> None:
    # One cancel scope for the connection, its deadline armed only while a send is
    # under way: a scope per message cost a tenth of the fan-out (bench --parts fanout).
    with trio.CancelScope() as sending:
        while True:
            published = await subscription.next()
            sending.deadline = trio.current_time() + _SEND_TIMEOUT
            await ws.send_message(published.text)
            sending.deadline = math.inf
    if sending.cancelled_caught:
        throttle.warning(
            "status subscriber stopped reading",
            "status subscriber %s stopped reading for %.0f s; disconnecting it",
            context_field("peer"),
            _SEND_TIMEOUT,
        )


async def _until_first(
    nursery: trio.Nursery, job: Callable[..., Awaitable[None]], *args: Any
) -> None:
    await job(*args)
    nursery.cancel_scope.cancel()


class _Watched(trio.abc.Stream):
    """A stream that tells when it ended: trio-websocket's handshake does not notice."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self.ended = trio.Event()
        self.failure: BaseException | None = None  # why it broke (a failed TLS handshake)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            self.failure = error.__cause__ or error
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        return data

    async def aclose(self) -> None:
        await self._stream.aclose()


def _address(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except (OSError, ValueError):
        return "?"
    return f"{host}:{port}"


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
        self._throttle = Throttle(log)

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
        """Serve one subscriber whose handshake arrived (its peer is in the log context)."""
        refusal = self._refusal(request)
        if refusal is not None:
            code, reason = refusal
            if code != 404:
                self._throttle.warning(
                    f"refused status subscribers (HTTP {code})",
                    "refused status subscriber %s: %s",
                    context_field("peer"),
                    reason,
                )
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
        peer = context_field("peer")
        self._throttle.log(
            logging.INFO, "status subscribers connected", "status subscriber %s connected", peer
        )
        try:
            with self._hub.subscribe() as subscription:
                async with trio.open_nursery() as nursery:
                    # Whichever ends first ends both: a subscriber that went away
                    # (or talked too much) does not wait for the next change.
                    nursery.start_soon(_until_first, nursery, _drain, ws, self._throttle)
                    await _until_first(nursery, _push, ws, subscription, self._throttle)
                if subscription.dropped:
                    log.info(
                        "status subscriber %s missed %d message(s) while slow",
                        peer,
                        subscription.dropped,
                    )
        except* ConnectionClosed:
            pass  # it went away, while we sent (from _push, in the nursery's group) or read
        finally:
            # The closing handshake waits for the peer's answer: not for ever.
            with trio.move_on_after(self._limits.connections.handshake_timeout):
                await ws.aclose()
            self._throttle.log(
                logging.INFO,
                "status subscribers disconnected",
                "status subscriber %s disconnected",
                peer,
            )

    async def _handshake(self, nursery: trio.Nursery, stream: _Watched) -> WebSocketRequest | None:
        """The subscriber's upgrade request; None if it closed or took too long."""
        request: WebSocketRequest | None = None
        with trio.move_on_after(self._limits.connections.handshake_timeout):
            async with trio.open_nursery() as race:

                async def upgrade() -> None:
                    nonlocal request
                    request = await wrap_server_stream(
                        nursery, stream, max_message_size=self._limits.max_message_bytes
                    )
                    race.cancel_scope.cancel()

                race.start_soon(upgrade)
                await stream.ended.wait()
                race.cancel_scope.cancel()
        if request is None and stream.failure is not None:
            self._throttle.warning(
                "status handshake failed",
                "status handshake with %s failed: %s",
                context_field("peer"),
                shown(str(stream.failure) or type(stream.failure).__name__),
            )
        return request

    async def _connection(self, stream: trio.SocketStream, slot: Slot) -> None:
        with log_context(peer=_address(stream)):
            transport: trio.abc.Stream = stream
            if self._ssl_context is not None:
                transport = trio.SSLStream(
                    stream, self._ssl_context, server_side=True, https_compatible=True
                )
            async with trio.open_nursery() as nursery:  # the websocket's reader task
                request = await self._handshake(nursery, _Watched(transport))
                if request is not None:
                    slot.settle()
                    await self.handle(request)
                nursery.cancel_scope.cancel()

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port``; ``task_status.started`` gets the bound port."""
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as error:
            raise ListenError("STATUS_PORT", host, port, error) from None
        bound = listeners[0].socket.getsockname()[1]
        gate = Gate[trio.SocketStream](
            f"status port {bound}",
            self._limits.connections,
            throttle=self._throttle,
        )
        task_status.started(bound)
        await serve_listeners(gate, listeners, self._connection)
