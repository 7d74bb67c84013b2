"""The status and metrics ports' connections: handshakes bounded, a cap, closed peers released.

trio-websocket's own server held a connection 60 s for a handshake that never
came, even from a peer that had closed it. Real TCP peers on loopback.
"""

from __future__ import annotations

import json
import logging
import math
import struct

import h11
import pytest
import trio
import trio.lowlevel
import trio_websocket
from helpers.peers import UPGRADE, eventually, watch

from fl_coordinator.app import Endpoints, serve
from fl_coordinator.config import Settings
from fl_coordinator.core.events import Status
from fl_coordinator.core.stages import Stage
from fl_coordinator.status.hub import StatusHub
from fl_coordinator.status.websocket import StatusServer


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


async def test_status_port_at_its_cap_makes_room_by_closing_unfinished_handshakes_only(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """Peers that start handshakes and never finish them cannot keep the webserver out.

    They used to: at the cap the new connection was closed at once, so peers
    replacing each connection the handshake timeout closed shut out real
    subscribers (2 of 40 got in during 20 s, against a cap of 50). Now the
    oldest connection still in its handshake makes room; subscribers are never
    closed for a newcomer, which is refused when every place holds one.
    """
    # A handshake timeout longer than the test: only the cap closes a connection.
    settings = settings.replace(max_connections=2, handshake_timeout=600)
    endpoints: Endpoints = await nursery.start(serve, settings)
    port, url = endpoints.status_port, endpoints.status_url
    first, second = [await silent_connection(port) for _ in range(2)]
    async with trio_websocket.open_websocket_url(url, connect_timeout=30) as one:
        assert json.loads(await one.get_message())["round"] == 1
        assert await closed_after(first) < 60  # the oldest unfinished handshake made room
        async with trio_websocket.open_websocket_url(url, connect_timeout=30) as two:
            assert json.loads(await two.get_message())["round"] == 1
            assert await closed_after(second) < 60
            third = await silent_connection(port)
            assert await closed_after(third) < 60  # every place holds a subscriber
            await third.aclose()
            assert (one.closed, two.closed) == (None, None)
        # The place of a subscriber that left is free as soon as the server reads its end.
        assert (await first_status_when_admitted(url))["round"] == 1
        assert one.closed is None
    await first.aclose()
    await second.aclose()


async def test_metrics_port_at_its_cap_still_answers_a_scrape(
    settings: Settings, nursery: trio.Nursery
) -> None:
    settings = settings.replace(metrics_port=0, max_connections=2, handshake_timeout=600)
    endpoints: Endpoints = await nursery.start(serve, settings)
    assert endpoints.metrics_port is not None
    stalled = [await silent_connection(endpoints.metrics_port) for _ in range(2)]
    assert await scrape(endpoints.metrics_port) == 200
    assert await closed_after(stalled[0]) < 60  # the oldest unfinished request made room
    for stream in stalled:
        await stream.aclose()


async def scrape(port: int) -> int:
    """The HTTP status of one ``GET /metrics``."""
    scraper = await silent_connection(port)
    client = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target="/metrics", headers=[("host", "127.0.0.1")])
    await scraper.send_all(client.send(request) + client.send(h11.EndOfMessage()))
    client.receive_data(await scraper.receive_some())
    response = client.next_event()
    await scraper.aclose()
    assert isinstance(response, h11.Response)
    return response.status_code


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

    assert await scrape(endpoints.metrics_port) == 200  # a real request is answered


async def test_a_subscriber_that_resets_while_being_sent_to_is_a_plain_disconnect(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber that goes away while a message is being sent to it (a reset, the
    common case for a browser tab closed) is said with one INFO line, not an ERROR
    with a traceback ("a connection's handler failed") as if the server had a bug."""
    hub = StatusHub("p", "c", queue_length=4)
    port = await nursery.start(StatusServer(hub).serve, "127.0.0.1", 0)
    peer = trio.socket.socket()
    peer.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await peer.connect(("127.0.0.1", port))
    stream = trio.SocketStream(peer)
    await stream.send_all(UPGRADE)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await stream.receive_some(1)
    assert answer.startswith(b"HTTP/1.1 101")
    # The peer reads nothing more: messages of ~10 KB fill both socket buffers
    # (at most 4 MB each way on Linux) and the server's send waits.
    many = tuple(f"selector-{i:04}.example:50051" for i in range(300))
    with caplog.at_level(logging.INFO, logger="fl_coordinator"):
        for accepted in range(1200):
            hub.publish(Status(1, Stage.SELECTION, accepted, 10**6, many, ()))
            await trio.lowlevel.checkpoint()
        peer.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # RST
        await eventually(lambda: any("disconnected" in r.getMessage() for r in caplog.records))
    assert hub.subscriber_count == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
