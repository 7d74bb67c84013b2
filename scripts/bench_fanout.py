"""Fan-out part of scripts/bench: how long a status change takes to reach every subscriber.

N websocket subscribers over 127.0.0.1, in a separate load process, follow
the coordinator's status server; M more complete the handshake and then
never read a byte. For each published change we time, from the publish,
each subscriber's receipt and the last one's (``time.monotonic``, one clock
for both processes), and compare the run without stalled subscribers with
the run with them, in the same run. The server's own cost is its process's
CPU time (``time.process_time``) over the timed changes, per subscriber per
message.

The subscribers are raw sockets read by one ``selectors`` loop that parses
just the frame headers (RFC 6455, section 5.2) and the ``accepted`` field:
a client light enough not to be half of its own figure (a trio-websocket
client per subscriber cost more CPU than the server it measured, on two
cores).
"""

from __future__ import annotations

import json
import selectors
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import trio
from bench_report import percentile

from fl_coordinator.connections import ConnectionLimits
from fl_coordinator.core.events import Status
from fl_coordinator.core.stages import Stage
from fl_coordinator.status.hub import StatusHub
from fl_coordinator.status.websocket import StatusLimits, StatusServer

HANDSHAKE = (
    b"GET /status HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _subscribers(url: str, count: int, changes: int) -> None:
    """The load process: ``count`` subscribers; prints ``ready``, ``done I`` lines, then times."""
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    arrivals: list[list[float]] = [[] for _ in range(changes)]
    poller = selectors.DefaultSelector()
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(HANDSHAKE)
        poller.register(sock, selectors.EVENT_READ, _Reader())
    ready = seen = 0
    while seen < count * changes:
        for key, _ in poller.select():
            reader: _Reader = key.data
            data = key.fileobj.recv(65536)  # type: ignore[union-attr]
            if not data:
                raise SystemExit("the status server closed a subscriber")
            now = time.monotonic()  # one clock for both processes
            for message in reader.feed(data):
                if not reader.greeted:  # the current status
                    reader.greeted = True
                    ready += 1
                    if ready == count:
                        print("ready", flush=True)
                    continue
                index = json.loads(message)["accepted"]
                arrivals[index].append(now)
                seen += 1
                if len(arrivals[index]) == count:
                    print("done", index, flush=True)
    print(json.dumps(arrivals), flush=True)


class _Reader:
    """One subscriber's bytes -> its text messages (the server sends them unmasked, whole)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._upgraded = False
        self.greeted = False  # the first message (the current status) was read

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        if not self._upgraded:
            head, found, rest = self._buffer.partition(b"\r\n\r\n")
            if not found:
                return []
            assert head.startswith(b"HTTP/1.1 101"), head[:80]
            self._buffer, self._upgraded = rest, True
        messages = []
        while len(self._buffer) >= 2:
            opcode, length, start = self._buffer[0] & 0x0F, self._buffer[1] & 0x7F, 2
            if length == 126:
                length, start = int.from_bytes(self._buffer[2:4], "big"), 4
            elif length == 127:
                length, start = int.from_bytes(self._buffer[2:10], "big"), 10
            if len(self._buffer) < start + length:
                break
            payload = self._buffer[start : start + length]
            self._buffer = self._buffer[start + length :]
            if opcode == 1:  # text; pings and the rest are not what is timed
                messages.append(payload)
        return messages


async def _run(subscribers: int, stalled: int, changes: int) -> dict[str, Any]:
    hub = StatusHub("bench", "checkpoint")
    published: list[float] = []
    blockers: list[socket.socket] = []
    async with trio.open_nursery() as nursery:
        # Room for every subscriber (the default MAX_CONNECTIONS is 1,000).
        limits = StatusLimits(connections=ConnectionLimits(max_connections=subscribers + stalled))
        port = await nursery.start(StatusServer(hub, limits).serve, "127.0.0.1", 0)
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
            cpu = time.process_time()
            for index in range(changes):
                published.append(time.monotonic())
                hub.publish(Status(1, Stage.SELECTION, index, 10**6, (), ()))
                assert await anext(lines) == f"done {index}"
            cpu = time.process_time() - cpu
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
        "server_cpu_us_per_subscriber_message": 1e6 * cpu / (subscribers * changes),
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
          f"{'each p50 ms':>11} {'each p99 ms':>11} {'server CPU us/sub/msg':>21}")  # fmt: skip
    for row in rows:
        print(f"{row['subscribers']:>11} {row['stalled']:>7} {row['to_last_p50_ms']:>14.1f} "
              f"{row['to_last_p99_ms']:>14.1f} {row['each_p50_ms']:>11.1f} "
              f"{row['each_p99_ms']:>11.1f} "
              f"{row['server_cpu_us_per_subscriber_message']:>21.1f}")  # fmt: skip
    return rows


if __name__ == "__main__":
    _subscribers(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
