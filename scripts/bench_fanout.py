"""Fan-out part of scripts/bench: how long a status change takes to reach every subscriber.

N real websocket subscribers (trio-websocket clients over 127.0.0.1, in this
process) follow the coordinator's status server; M more complete the
handshake and then never read a byte. For each published change we time,
from the publish, each subscriber's receipt and the last one's, and compare
the run without stalled subscribers with the run with them (same process,
same run).
"""

from __future__ import annotations

import json
import socket
import statistics
from typing import Any

import trio
import trio_websocket

from fl_coordinator.rounds import Stage, Status
from fl_coordinator.status import StatusHub
from fl_coordinator.websocket import StatusServer

HANDSHAKE = (
    b"GET /status HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _run(subscribers: int, stalled: int, changes: int) -> dict[str, Any]:
    hub = StatusHub("bench", "checkpoint")
    arrivals: list[list[float]] = [[] for _ in range(changes)]
    complete = [trio.Event() for _ in range(changes)]
    all_ready = trio.Event()
    ready = 0
    blockers: list[socket.socket] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(StatusServer(hub).serve, "127.0.0.1", 0)
        for _ in range(stalled):
            blocker = socket.socket()
            blocker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            blocker.connect(("127.0.0.1", port))
            blocker.sendall(HANDSHAKE)
            blockers.append(blocker)

        async def subscriber() -> None:
            nonlocal ready
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/status") as ws:
                await ws.get_message()  # the current status
                ready += 1
                if ready == subscribers:
                    all_ready.set()
                for _ in range(changes):
                    index = json.loads(await ws.get_message())["accepted"]
                    arrivals[index].append(trio.current_time())
                    if len(arrivals[index]) == subscribers:
                        complete[index].set()

        hub.publish(Status(0, Stage.SELECTION, 0, 1, (), ()))
        for _ in range(subscribers):
            nursery.start_soon(subscriber)
        with trio.fail_after(120):
            await all_ready.wait()
            to_last = []
            each = []
            for index in range(changes):
                published = trio.current_time()
                hub.publish(Status(1, Stage.SELECTION, index, 10**6, (), ()))
                await complete[index].wait()
                to_last.append(max(arrivals[index]) - published)
                each.extend(t - published for t in arrivals[index])
        nursery.cancel_scope.cancel()
    for blocker in blockers:
        blocker.close()
    return {
        "subscribers": subscribers,
        "stalled": stalled,
        "changes": changes,
        "to_last_p50_ms": 1000 * statistics.median(to_last),
        "to_last_p99_ms": 1000 * percentile(to_last, 0.99),
        "each_p50_ms": 1000 * statistics.median(each),
        "each_p99_ms": 1000 * percentile(each, 0.99),
    }


def bench_fanout(subscribers: int, stalled: int, changes: int) -> list[dict[str, Any]]:
    rows = [trio.run(_run, subscribers, count, changes) for count in (0, stalled)]
    print(f"{'subscribers':>11} {'stalled':>7} {'to last p50 ms':>14} {'to last p99 ms':>14} "
          f"{'each p50 ms':>11} {'each p99 ms':>11}")  # fmt: skip
    for row in rows:
        print(f"{row['subscribers']:>11} {row['stalled']:>7} {row['to_last_p50_ms']:>14.1f} "
              f"{row['to_last_p99_ms']:>14.1f} {row['each_p50_ms']:>11.1f} "
              f"{row['each_p99_ms']:>11.1f}")  # fmt: skip
    return rows
