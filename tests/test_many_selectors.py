"""A whole round of 2,000 selectors, against ``fl-coordinator serve`` under ``ulimit -n 1024``.

Check-ins, ``GoalCountReached`` to each selector, reports, the checks of
2,000 aggregate files and their average all happen in a coordinator whose
descriptor limit is below the number of selectors (issue 16): what it holds
must not grow with them.

The 2,000 selectors are one process of the test: every selector id is an
address ``127.0.A.B:port`` of loopback, all reaching one listener, which
notes the address each connection was made to (``getsockname``) and relays
it to one real gRPC server answering ``GoalCountReached``. The test itself
so needs a few descriptors per connection the coordinator keeps, not one
per selector.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import purerpc
import trio
from helpers.peers import completed, fedavg, read_floats, watch, write_aggregate
from helpers.processes import Served, environment
from helpers.relay import relay

from fl_coordinator._proto import fl_intra_grpc, fl_intra_pb2
from fl_coordinator.config import Settings
from fl_coordinator.rpc.listener import serve_grpc
from fl_coordinator.storage.layout import Layout

SELECTORS = 2000
OPEN_FILES = 1024


class Loopback:
    """One listener for every ``127.0.A.B:port``; connections relayed to ``target``.

    ``dialed`` holds each address a connection was made to, ``connections``
    counts them. Only loopback peers are served.
    """

    def __init__(self, target: int) -> None:
        self._target = target
        self.dialed: set[str] = set()
        self.connections = 0
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(("0.0.0.0", 0))  # every 127.0.A.B; non-loopback peers are closed
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self._relay, [trio.SocketListener(sock)])

    def address(self, index: int) -> str:
        return f"127.0.{1 + index // 250}.{1 + index % 250}:{self.port}"

    async def _relay(self, client: trio.SocketStream) -> None:
        async with client:
            if not client.socket.getpeername()[0].startswith("127."):
                return
            host, port = client.socket.getsockname()[:2]
            self.dialed.add(f"{host}:{port}")
            self.connections += 1
            await relay(client, self._target)


class Selectors(fl_intra_grpc.FLGoalCountBroadcastServicer):
    """Answers ``GoalCountReached`` for every selector; ``all_told`` once it was told K times."""

    def __init__(self) -> None:
        self.told = 0
        self.all_told = trio.Event()

    async def GoalCountReached(self, message: fl_intra_pb2.Empty) -> fl_intra_pb2.Empty:
        self.told += 1
        if self.told == SELECTORS:
            self.all_told.set()
        return fl_intra_pb2.Empty()


async def _each(port: int, call: Callable[[Any, str], Awaitable[object]], ids: list[str]) -> None:
    """``call(stub, id)`` for every id, 64 at a time, over one new connection (the last one
    may have been closed as idle meanwhile: IDLE_CONNECTION_TIMEOUT)."""
    limit = trio.CapacityLimiter(64)
    async with purerpc.insecure_channel("127.0.0.1", port) as channel:
        stub = fl_intra_grpc.FlIntraStub(channel)

        async def one(selector: str) -> None:
            async with limit:
                await call(stub, selector)

        async with trio.open_nursery() as calls:
            for selector in ids:
                calls.start_soon(one, selector)


def _crowded(messages: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """Consecutive status messages of one phase less than 0.1 s apart (seq, seq, gap in
    ms), the last message of each phase excepted. Their times are cut to milliseconds, so
    two 0.1 s apart may show 99 ms: 1 ms is allowed. (Counted in whole milliseconds: as
    floats, a gap of 99 ms came out 0.09899997 s, below 0.099.)"""

    def phase(message: dict[str, Any]) -> tuple[int, str, bool]:
        return message["round"], message["stage"], message["aggregating"]

    def ms(message: dict[str, Any]) -> int:
        moment = datetime.fromisoformat(message["time"].replace("Z", "+00:00"))
        return round(moment.timestamp() * 1000)

    return [
        (a["seq"], b["seq"], ms(b) - ms(a))
        for a, b, after in zip(messages, messages[1:], messages[2:], strict=False)
        if phase(a) == phase(b) == phase(after)
        and ms(b) - ms(a) < 99
    ]  # fmt: skip


async def test_a_round_of_2000_selectors_under_1024_descriptors(
    settings: Settings, layout: Layout, keras_weights: list[Path], nursery: trio.Nursery
) -> None:
    before = read_floats(layout.checkpoint)
    selectors = Selectors()
    loopback = Loopback(await nursery.start(serve_grpc, [selectors.service], "127.0.0.1", 0))
    await loopback.start(nursery)
    ids = [loopback.address(index) for index in range(SELECTORS)]
    for selector in ids:
        write_aggregate(layout, selector, keras_weights[0], 1)

    env = environment(
        Path(settings.fl_root_path),
        CHECKIN_LIMIT=str(SELECTORS),
        GOAL_COUNT_TIMEOUT="60",
        CHECK_TIMEOUT="120",
        REPORTING_TIMEOUT="0",
    )
    with Served(env, open_files=OPEN_FILES) as server:
        port, status_url = await trio.to_thread.run_sync(server.ready)
        watcher = await watch(nursery, status_url)

        async def check_in(stub: Any, selector: str) -> None:
            answer = await stub.ClientCountUpdate(fl_intra_pb2.ClientCount(count=1, id=selector))
            assert answer.accepted

        async def report(stub: Any, selector: str) -> None:
            await stub.SelectorAggregationComplete(fl_intra_pb2.SelectorId(id=selector))

        await _each(port, check_in, ids)
        with trio.fail_after(600):
            await selectors.all_told.wait()
        assert loopback.dialed == set(ids)  # each selector's own address, dialed
        assert loopback.connections == SELECTORS  # once: retries would dial again
        await _each(port, report, ids)
        with trio.fail_after(1200):
            done = await watcher.wait_for(completed(1))
        assert (done["stage"], done["rejected"], len(done["reported"])) == (
            "COMPLETED",
            {},
            SELECTORS,
        )
        assert server.process.poll() is None
    # Each status message lists every selector taking part. Within one stage they come
    # at most every 0.1 s (the stage's last, sent as the next begins, excepted), not
    # one per check-in or report: that was O(N**2) bytes a round, hundreds of MB here.
    assert _crowded(watcher.messages) == []
    # 2,000 identical aggregates of weight 1: the average of one.
    expected = fedavg(before, [(keras_weights[0], 1)])
    after = read_floats(layout.checkpoint)
    for name, values in expected.items():
        np.testing.assert_allclose(after[name], values, rtol=1e-6, err_msg=name)
