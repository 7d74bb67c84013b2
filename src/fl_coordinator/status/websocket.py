"""The websocket status stream for the webserver: ``ws://HOST:STATUS_PORT/status``.

Each subscriber gets the current status, then one JSON text message per
change (:mod:`.subscriber`: written to its socket as the change is
published, the same frame bytes for every subscriber). A subscriber that
does not take a message within :data:`_SEND_TIMEOUT` seconds (its TCP
buffers are full: it stopped reading) is disconnected, so a stuck peer holds
no resources for long; it only ever delays itself.

Only the webserver should watch: with a token set, the handshake must carry
``Authorization: Bearer <token>`` or it is answered HTTP 401 before the
upgrade. The number of subscribers is capped (HTTP 503 beyond it), and as
subscribers have nothing to say, a message larger than a few bytes closes
the connection (code 1009).

Connections are accepted through a :class:`~..connections.Gate` (at most
``MAX_CONNECTIONS``, shed when descriptors run out), and the handshake (TLS,
then the HTTP upgrade) must complete within ``HANDSHAKE_TIMEOUT``. A
plaintext request on a TLS port is answered in plaintext, HTTP 400 "use
wss://", as web servers do: otherwise its client waits out its own timeout
for an answer that never comes (trio-websocket's: 60 s). Only the requests
OpenSSL recognizes are (a GET, HEAD, POST or PUT, its HTTP_REQUEST error,
which every websocket handshake is); other bytes fail the handshake, and the
connection is closed without a word.

The same port answers plain HTTP GETs (:mod:`.pages`: the dashboard,
``/status``, ``/rounds``): the request head is read with h11, and a
websocket upgrade is handed, as received, to wsproto (the protocol engine
trio-websocket is built on: we drive it ourselves so that a change is framed
once, not once per subscriber). A browser cannot set headers on a
websocket, so the dashboard sends the token as a subprotocol instead,
``bearer.<token in base64url>`` next to :data:`SUBPROTOCOL`, which the
server then selects (as Kubernetes' API server does).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.utilities import RemoteProtocolError

from ..connections import ConnectionLimits, Gate, Slot, serve_listeners
from ..errors import ListenError
from ..log_throttle import Throttle
from ..logs import context_field, log_context
from ..plaintext_refusal import plaintext_refusal
from ..rpc.auth import AUTHORIZATION, bearer_problem, header_value
from ..untrusted_text import shown
from .http import Answer, Head, linger, read_head, send_answer
from .hub import StatusHub
from .pages import Pages
from .rounds import RoundRecord
from .subscriber import Subscriber, SubscriberLimits

__all__ = ["PATH", "SUBPROTOCOL", "StatusLimits", "StatusServer"]

log = logging.getLogger(__name__)

PATH = "/status"
#: The subprotocol a browser proposes with ``bearer.<token in base64url>``.
SUBPROTOCOL = "fl-status"
_BEARER_PROTOCOL = "bearer."
_SEND_TIMEOUT = 10.0
#: The answer to a plaintext HTTP request on a TLS port (OpenSSL's HTTP_REQUEST error).
_PLAINTEXT_ANSWER = plaintext_refusal(
    "this port speaks TLS: use wss:// for the status stream, https:// for its pages"
)


@dataclass(frozen=True)
class StatusLimits:
    """Who may subscribe and how much they may cost (see STATUS_* keys)."""

    token: str = field(default="", repr=False)  # empty: anyone may subscribe
    max_subscribers: int = 0  # 0: no limit
    max_message_bytes: int = 4096  # what one subscriber may send in one message
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)


def _browser_authorization(request: Request) -> str | None:
    """The ``Authorization`` value a browser's ``bearer.<base64url>`` subprotocol stands for."""
    for proposed in request.subprotocols:
        if proposed.startswith(_BEARER_PROTOCOL):
            encoded = proposed.removeprefix(_BEARER_PROTOCOL)
            try:
                token = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            except (binascii.Error, ValueError):
                return "Bearer (undecodable)"
            return "Bearer " + token.decode("utf-8", "replace")
    return None


def _address(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except (OSError, ValueError):
        return "?"
    return f"{host}:{port}"


class _PlaintextRequest(Exception):
    """A plaintext HTTP request arrived where a TLS handshake was expected."""


async def _send_quietly(stream: trio.abc.Stream, data: bytes) -> bool:
    """Send ``data``; False if the peer is gone."""
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


class StatusServer:
    """Serves the hub's messages to websocket subscribers."""

    def __init__(
        self,
        hub: StatusHub,
        limits: StatusLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        *,
        problem_id: str = "",
        rounds: Callable[[int | None, int], list[RoundRecord]] = lambda before, limit: [],
    ) -> None:
        """``rounds(before, limit)``: the round history ``GET /rounds`` serves."""
        self._hub = hub
        self._limits = limits or StatusLimits()
        self._pages = Pages(problem_id, lambda: hub.latest, rounds, self._limits.token)
        self._ssl_context = ssl_context
        self._connections = 0  # accepted or being accepted (the cap counts both)
        self._throttle = Throttle(log)
        self._subscriber_limits = SubscriberLimits(
            queue_length=hub.queue_length,
            send_timeout=_SEND_TIMEOUT,
            close_timeout=self._limits.connections.handshake_timeout,
            max_message_bytes=self._limits.max_message_bytes,
        )

    @property
    def connected(self) -> int:
        """Subscribers connected now, or being accepted (read by the metrics)."""
        return self._connections

    def _refusal(self, request: Request) -> tuple[int, str] | None:
        """The HTTP status and reason to refuse a handshake with, or None to accept it."""
        if request.target.split("?", 1)[0] != PATH:
            return 404, f"the status stream is at {PATH}"
        if self._limits.token:
            authorization = header_value(request.extra_headers, AUTHORIZATION)
            if authorization is None:
                authorization = _browser_authorization(request)
            problem = bearer_problem(authorization, self._limits.token)
            if problem is not None:
                return 401, f"unauthorized: {problem}"
        cap = self._limits.max_subscribers
        if cap and self._connections >= cap:
            return 503, f"too many subscribers (MAX_STATUS_SUBSCRIBERS={cap})"
        return None

    async def _refuse(self, stream: trio.abc.Stream, head: Head, code: int, reason: str) -> None:
        if code not in (400, 404):
            self._throttle.warning(
                f"refused status subscribers (HTTP {code})",
                "refused status subscriber %s: %s",
                context_field("peer"),
                reason,
            )
        headers = [("www-authenticate", "Bearer")] if code == 401 else []
        answer = Answer(code, f"{reason}\n".encode(), headers=headers)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await send_answer(stream, head, answer)

    async def _upgrade(self, stream: trio.abc.Stream, head: Head) -> WSConnection | None:
        """The accepted websocket of the upgrade request ``head``, counted in
        :attr:`connected`; None if it was refused or the peer went away."""
        connection = WSConnection(ConnectionType.SERVER)
        try:
            connection.receive_data(head.received)
            request = next((e for e in connection.events() if isinstance(e, Request)), None)
        except RemoteProtocolError as error:
            await self._refuse(stream, head, 400, f"not a websocket upgrade: {error}")
            return None
        if request is None:
            await self._refuse(stream, head, 400, "not a websocket upgrade")
            return None
        refusal = self._refusal(request)
        if refusal is not None:
            await self._refuse(stream, head, *refusal)
            return None
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in request.subprotocols else None
        self._connections += 1  # counted at once: the cap holds for upgrades in flight
        if not await _send_quietly(stream, connection.send(AcceptConnection(subprotocol))):
            self._connections -= 1
            return None
        return connection

    async def _serve(self, stream: trio.abc.Stream, connection: WSConnection) -> None:
        """Serve one accepted subscriber (its peer is in the log context) until it goes."""
        peer = context_field("peer")
        self._throttle.log(
            logging.INFO, "status subscribers connected", "status subscriber %s connected", peer
        )
        subscriber = Subscriber(stream, connection, self._subscriber_limits)
        try:
            with self._hub.attach(subscriber):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send, subscriber, nursery.cancel_scope)
                    await subscriber.receive()
                    if not subscriber.closing:
                        nursery.cancel_scope.cancel()  # it went away: nothing to close
            if subscriber.too_big:
                self._throttle.warning(
                    "status subscriber sent too large a message",
                    "status subscriber %s sent a message larger than "
                    "STATUS_MAX_MESSAGE_BYTES; disconnected",
                    peer,
                )
            if subscriber.dropped:
                log.info(
                    "status subscriber %s missed %d message(s) while slow",
                    peer,
                    subscriber.dropped,
                )
        finally:
            self._throttle.log(
                logging.INFO,
                "status subscribers disconnected",
                "status subscriber %s disconnected",
                peer,
            )

    async def _send(self, subscriber: Subscriber, connection: trio.CancelScope) -> None:
        """Run the subscriber's writes; whichever way they end, the connection ends."""
        try:
            await subscriber.send()
        except trio.TooSlowError:
            self._throttle.warning(
                "status subscriber stopped reading",
                "status subscriber %s stopped reading for %.0f s; disconnecting it",
                context_field("peer"),
                _SEND_TIMEOUT,
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it went away while we wrote
        finally:
            connection.cancel()

    async def _head(self, stream: trio.abc.Stream) -> Head | None:
        """The request head (a plain GET or an upgrade); None if it is not one."""
        try:
            return await read_head(stream)
        except h11.ProtocolError as error:
            self._throttle.log(
                logging.DEBUG,
                "status port requests dropped",
                "status port request from %s dropped: %s",
                context_field("peer"),
                shown(str(error)),
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            failure = error.__cause__ or error  # a failed TLS handshake, a reset
            if isinstance(failure, ssl.SSLError) and failure.reason == "HTTP_REQUEST":
                raise _PlaintextRequest from error
            self._throttle.warning(
                "status handshake failed",
                "status handshake with %s failed: %s",
                context_field("peer"),
                shown(str(failure) or type(failure).__name__),
            )
        return None

    async def _connection(self, stream: trio.SocketStream, slot: Slot) -> None:
        with log_context(peer=_address(stream)):
            transport: trio.abc.Stream = stream
            if self._ssl_context is not None:
                transport = trio.SSLStream(
                    stream, self._ssl_context, server_side=True, https_compatible=True
                )
            connection = None
            with trio.move_on_after(self._limits.connections.handshake_timeout):
                try:
                    head = await self._head(transport)
                except _PlaintextRequest:
                    await self._answer_plaintext(stream)
                    return
                if head is not None and not head.upgrades_to_websocket:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await send_answer(transport, head, self._pages.answer(head))
                elif head is not None:
                    connection = await self._upgrade(transport, head)
            if connection is None:
                return
            slot.settle()
            try:
                await self._serve(transport, connection)
            finally:
                self._connections -= 1

    async def _answer_plaintext(self, stream: trio.SocketStream) -> None:
        """HTTP 400 "use wss://", in plaintext; then linger (:func:`.http.linger`): a
        socket closed with unread data resets the connection, and the answer may be lost
        on its way."""
        self._throttle.warning(
            "plaintext requests on the TLS status port",
            "plaintext HTTP request on the TLS status port from %s: answered HTTP 400 (the "
            "client should use wss:// or https://)",
            context_field("peer"),
        )
        if await _send_quietly(stream, _PLAINTEXT_ANSWER):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await linger(stream)

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
