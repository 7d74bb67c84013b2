"""Fan-out part of scripts/bench: how long a status change takes to reach every subscriber.

N real websocket subscribers (trio-websocket clients over 127.0.0.1, in a
separate load process, so the clients' own work is not on the server's
loop) follow the coordinator's status server; M more complete the handshake
and then never read a byte. For each published change we time, from the
publish, each subscriber's receipt and the last one's (``time.monotonic``,
one clock for both processes), and compare the run without stalled
subscribers with the run with them, in the same run.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import trio
import trio_websocket
from bench_report import percentile

from fl_coordinator.core.events import Status
from fl_coordinator.core.stages import Stage
from fl_coordinator.status.hub import StatusHub
from fl_coordinator.status.websocket import StatusServer

HANDSHAKE = (
    b"GET /status HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def _subscribers(url: str, count: int, changes: int) -> None:
    """The load process: ``count`` subscribers; prints ``ready``, ``done I`` lines, then times."""
    arrivals: list[list[float]] = [[] for _ in range(changes)]
    ready = 0

    async def subscriber() -> None:
        nonlocal ready
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.get_message()  # the current status
            ready += 1
            if ready == count:
                print("ready", flush=True)
            for _ in range(changes):
                index = json.loads(await ws.get_message())["accepted"]
                arrivals[index].append(time.monotonic())  # one clock for both processes
                if len(arrivals[index]) == count:
                    print("done", index, flush=True)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(subscriber)
    print(json.dumps(arrivals), flush=True)


async def _run(subscribers: int, stalled: int, changes: int) -> dict[str, Any]:
    hub = StatusHub("bench", "checkpoint")
    published: list[float] = []
    blockers: list[socket.socket] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(StatusServer(hub).serve, "127.0.0.1", 0)
        for _ in range(stalled):
            blocker = socket.socket()
            blocker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            blocker.connect(("127.0.0.1", port))
            blocker.sendall(HANDSHAKE)
            blockers.append(blocker)
        hub.publish(Status(0, Stage.SELECTION, 0, 1, (), ()))
        command = [sys.executable, __file__, f"ws://127.0.0.1:{port}/status",
                   str(subscribers), str(changes)]  # fmt: skip
        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
        assert process.stdout is not None
        lines = _lines(process.stdout)
        with trio.fail_after(300):
            assert await anext(lines) == "ready"
            for index in range(changes):
                published.append(time.monotonic())
                hub.publish(Status(1, Stage.SELECTION, index, 10**6, (), ()))
                assert await anext(lines) == f"done {index}"
            arrivals = json.loads(await anext(lines))
            await process.wait()
        nursery.cancel_scope.cancel()
    for blocker in blockers:
        blocker.close()
    to_last = [max(times) - start for times, start in zip(arrivals, published, strict=True)]
    each = [t - start for times, start in zip(arrivals, published, strict=True) for t in times]
    return {
        "subscribers": subscribers,
        "stalled": stalled,
        "changes": changes,
        "to_last_p50_ms": 1000 * statistics.median(to_last),
        "to_last_p99_ms": 1000 * percentile(to_last, 0.99),
        "each_p50_ms": 1000 * statistics.median(each),
        "each_p99_ms": 1000 * percentile(each, 0.99),
    }


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buffer = b""
    async for data in stream:
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()


def bench_fanout(subscribers: int, stalled: int, changes: int) -> list[dict[str, Any]]:
    rows = [trio.run(_run, subscribers, count, changes) for count in (0, stalled)]
    print(f"{'subscribers':>11} {'stalled':>7} {'to last p50 ms':>14} {'to last p99 ms':>14} "
          f"{'each p50 ms':>11} {'each p99 ms':>11}")  # fmt: skip
    for row in rows:
        print(f"{row['subscribers']:>11} {row['stalled']:>7} {row['to_last_p50_ms']:>14.1f} "
              f"{row['to_last_p99_ms']:>14.1f} {row['each_p50_ms']:>11.1f} "
              f"{row['each_p99_ms']:>11.1f}")  # fmt: skip
    return rows


if __name__ == "__main__":
    trio.run(_subscribers, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
