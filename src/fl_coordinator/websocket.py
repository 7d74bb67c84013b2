"""The websocket status stream for the webserver: ``ws://HOST:STATUS_PORT/status``.

Each subscriber gets the current status, then one JSON text message per
change, from its own :class:`~.status.Subscription`. A subscriber that does
not take a message within :data:`SEND_TIMEOUT` seconds (its TCP buffers are
full: it stopped reading) is disconnected, so a stuck peer holds no resources
for long; it only ever delays itself.
"""

from __future__ import annotations

import logging
import math

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
)

from .net import bind_error
from .status import StatusHub, Subscription

log = logging.getLogger(__name__)

PATH = "/status"
SEND_TIMEOUT = 10.0


async def _drain(ws: WebSocketConnection) -> None:
    """Read (and ignore) what the subscriber sends; return when it goes away."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed:
        return


async def _push(ws: WebSocketConnection, subscription: Subscription, peer: str) -> None:
    # One cancel scope for the connection, its deadline armed only while a send is
    # under way: a scope per message cost a tenth of the fan-out (bench --parts fanout).
    with trio.CancelScope() as sending:
        while True:
            published = await subscription.next()
            sending.deadline = trio.current_time() + SEND_TIMEOUT
            await ws.send_message(published.text)
            sending.deadline = math.inf
    if sending.cancelled_caught:
        log.warning(
            "status subscriber %s stopped reading for %.0f s; disconnecting it",
            peer,
            SEND_TIMEOUT,
        )


class StatusServer:
    """Serves the hub's messages to websocket subscribers."""

    def __init__(self, hub: StatusHub) -> None:
        self._hub = hub
        #: Subscribers connected now (read by the metrics).
        self.connected = 0

    async def handle(self, request: WebSocketRequest) -> None:
        if request.path != PATH:
            await request.reject(404, body=f"the status stream is at {PATH}\n".encode())
            return
        ws = await request.accept()
        peer = f"{ws.remote.address}:{ws.remote.port}" if hasattr(ws.remote, "port") else "?"
        log.info("status subscriber %s connected", peer)
        self.connected += 1
        try:
            with self._hub.subscribe() as subscription:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_drain, ws)
                    await _push(ws, subscription, peer)
                    nursery.cancel_scope.cancel()
                if subscription.dropped:
                    log.info(
                        "status subscriber %s missed %d message(s) while slow",
                        peer,
                        subscription.dropped,
                    )
        except ConnectionClosed:
            pass
        finally:
            self.connected -= 1
            await ws.aclose()
            log.info("status subscriber %s disconnected", peer)

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port``; ``task_status.started`` gets the bound port."""
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as error:
            raise bind_error("STATUS_PORT", host, port, error) from None
        server = WebSocketServer(self.handle, listeners)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            task_status.started(server.port)
