"""The status and metrics ports' connections: handshakes bounded, a cap, closed peers released.

trio-websocket's own server held a connection 60 s for a handshake that never
came, even from a peer that had closed it. Real TCP peers on loopback.
"""

from __future__ import annotations

import json
import math

import h11
import trio
import trio_websocket
from helpers.peers import watch

from fl_coordinator.app import Endpoints, serve
from fl_coordinator.config import Settings


async def closed_after(stream: trio.SocketStream, limit: float = 60) -> float:
    """Seconds until the server closes ``stream`` (what it sends is read); inf after ``limit``."""
    started = trio.current_time()
    with trio.move_on_after(limit):
        try:
            while await stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass  # reset: closed too
        return trio.current_time() - started
    return math.inf


async def silent_connection(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def test_status_handshake_that_never_comes_is_dropped(
    settings: Settings, nursery: trio.Nursery
) -> None:
    endpoints: Endpoints = await nursery.start(serve, settings.replace(handshake_timeout=0.5))
    silent = await silent_connection(endpoints.status_port)
    waited = await closed_after(silent)
    assert 0.4 <= waited < 60
    await silent.aclose()
    watcher = await watch(nursery, endpoints.status_url)  # and the port still serves
    assert (await watcher.wait_for(lambda m: True))["round"] == 1


async def test_status_port_refuses_beyond_max_connections_and_frees_closed_ones_at_once(
    settings: Settings, nursery: trio.Nursery
) -> None:
    # A handshake timeout longer than the test: only closing frees a place.
    settings = settings.replace(max_connections=2, handshake_timeout=600)
    endpoints: Endpoints = await nursery.start(serve, settings)
    first, second = [await silent_connection(endpoints.status_port) for _ in range(2)]
    third = await silent_connection(endpoints.status_port)
    assert await closed_after(third) < 60  # refused at once (not after 600 s)
    await first.aclose()
    await second.aclose()
    # The places are free as soon as the server reads the peers' end (long before 600 s).
    assert (await first_status_when_admitted(endpoints.status_url))["round"] == 1
    await third.aclose()


async def first_status_when_admitted(url: str, limit: float = 60) -> dict:
    """The first status message, retrying while the port refuses the connection.

    (trio-websocket's client does not notice a connection closed during its
    handshake either: each attempt has a time limit of its own.)
    """
    with trio.fail_after(limit):
        while True:
            try:
                async with trio_websocket.open_websocket_url(url, connect_timeout=2) as ws:
                    return json.loads(await ws.get_message())
            except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError):
                await trio.sleep(0.05)


async def test_metrics_request_that_never_comes_is_dropped(
    settings: Settings, nursery: trio.Nursery
) -> None:
    settings = settings.replace(metrics_port=0, handshake_timeout=0.5)
    endpoints: Endpoints = await nursery.start(serve, settings)
    assert endpoints.metrics_port is not None
    silent = await silent_connection(endpoints.metrics_port)
    assert 0.4 <= await closed_after(silent) < 60
    await silent.aclose()

    scraper = await silent_connection(endpoints.metrics_port)  # a real request is answered
    client = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target="/metrics", headers=[("host", "127.0.0.1")])
    await scraper.send_all(client.send(request) + client.send(h11.EndOfMessage()))
    client.receive_data(await scraper.receive_some())
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 200
    await scraper.aclose()
