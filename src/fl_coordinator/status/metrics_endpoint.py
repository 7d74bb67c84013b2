"""The Prometheus scrape endpoint: ``GET http://HOST:METRICS_PORT/metrics``.

A small HTTP/1.1 server on trio and h11 (:mod:`.http`; already a dependency,
through wsproto and httpx) rather than prometheus-client's ``start_http_server``:
that one runs in a thread of its own that nothing can stop or wait for, binds
with its own rules and reports a busy port as a traceback. Here the endpoint
is one more task in the coordinator's nursery, cancelled with the rest,
listening on ``HOST`` like the other ports and failing to start with the same
one-line ``ConfigError``. It also reads the metrics on the event loop, where
they are updated, so no lock is needed.

One request per connection (``Connection: close``). A client
has ``HANDSHAKE_TIMEOUT`` seconds to send its request and read the answer;
connections are accepted through a :class:`~..connections.Gate` like the
other ports' (``MAX_CONNECTIONS``, shedding).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import h11
import trio
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..connections import ConnectionLimits, Gate, Slot, serve_listeners
from ..errors import ListenError
from ..log_throttle import Throttle
from ..untrusted_text import shown
from .http import Answer, read_head, send_answer

__all__ = ["PATH", "serve_metrics"]

log = logging.getLogger(__name__)

PATH = "/metrics"


async def _handle(
    render: Callable[[], bytes],
    limits: ConnectionLimits,
    throttle: Throttle,
    stream: trio.SocketStream,
    slot: Slot,
) -> None:
    try:
        with trio.move_on_after(limits.handshake_timeout):
            head = await read_head(stream)
            if not head.reads:
                answer = Answer(405, b"only GET or HEAD\n")
            elif head.path != PATH:
                answer = Answer(404, f"metrics are at {PATH}\n".encode())
            else:
                answer = Answer(200, render(), CONTENT_TYPE_LATEST)
            await send_answer(stream, head, answer)
    except (h11.ProtocolError, trio.BrokenResourceError) as error:
        throttle.log(
            logging.DEBUG,
            "metrics request dropped",
            "metrics request dropped: %s",
            shown(str(error)),
        )


async def serve_metrics(
    render: Callable[[], bytes],
    host: str,
    port: int,
    *,
    limits: ConnectionLimits | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``render()`` at :data:`PATH` on ``host:port``; ``started`` gets the bound port."""
    limits = limits or ConnectionLimits()
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as error:
        raise ListenError("METRICS_PORT", host, port, error) from None
    bound = listeners[0].socket.getsockname()[1]
    throttle = Throttle(log)
    gate = Gate[trio.SocketStream](f"metrics port {bound}", limits, throttle=throttle)
    task_status.started(bound)
    await serve_listeners(gate, listeners, functools.partial(_handle, render, limits, throttle))
