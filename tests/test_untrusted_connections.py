"""Peers as attackers, against ``fl-coordinator serve`` as an operator runs it (issue 12).

Each test starts the real command in a process of its own (under ``prlimit``
where the process's descriptor limit is the point), attacks it over real
sockets on 127.0.0.1 with raw HTTP/2 (``helpers.h2peer``), grpcio or plain
TCP, and reads what it costs from ``/proc/<pid>`` (open descriptors, resident
memory) and from its log. Conditions are polled with a deadline: these tests
run on a loaded two-core machine.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import h2.errors
import h2.events
import pytest
import trio
import trio_websocket
from helpers.h2peer import CHECK_IN, RawPeer, check_in_body, padded
from helpers.peers import GrpcioClient
from helpers.processes import Served, environment, wait_until
from hyperframe.frame import HeadersFrame

from fl_coordinator._proto import health_pb2
from fl_coordinator.config import Settings
from fl_coordinator.connections import port_share

HERE = Path(__file__).resolve().parent
TOKEN = "t0ken-for-the-attack-tests"
#: What the log may grow by during an attack (the issue's bound).
LOG_BOUND = 64 * 1024


@pytest.fixture
def served() -> Iterator[list[Served]]:
    """Processes started by the test, killed at its end whatever happened."""
    started: list[Served] = []
    yield started
    for server in started:
        server.process.kill()
        server.process.wait()


def start(
    settings: Settings, served: list[Served], open_files: int | None = None, **env: str
) -> tuple[Served, int, str]:
    """``serve`` on a copy of the problem folder: the process, its gRPC port and status URL."""
    server = Served(environment(Path(settings.fl_root_path), **env), open_files=open_files)
    served.append(server)
    return server, *server.ready()


def stop(server: Served) -> str:
    """SIGTERM, wait, and the whole log (what a throttle still held is written on the way out)."""
    server.process.terminate()
    assert server.process.wait(timeout=30) == 0
    return server.rest()


def settled_files(server: Served, limit: float = 60) -> int:
    """The descriptors ``server`` holds once the count has not changed for a second."""
    deadline = time.monotonic() + limit
    count = server.open_files()
    while time.monotonic() < deadline:
        if not wait_until(lambda last=count: server.open_files() != last, 1.0):
            return count
        count = server.open_files()
    raise AssertionError(f"the descriptor count never settled (last {count})")


def sockets_of(server: Served) -> int:
    """Sockets among the descriptors ``server`` holds now."""
    folder = f"/proc/{server.process.pid}/fd"
    kinds = []
    for name in os.listdir(folder):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            kinds.append(os.readlink(f"{folder}/{name}"))
    return sum(kind.startswith("socket:") for kind in kinds)


def sockets_on(server: Served, port: int) -> int:
    """Sockets ``server`` holds now whose local port is ``port`` (its listener and the
    connections it accepted there; not its outgoing ones, such as GoalCountReached's)."""
    folder = f"/proc/{server.process.pid}/fd"
    inodes = set()
    for name in os.listdir(folder):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            inodes.add(os.readlink(f"{folder}/{name}").removeprefix("socket:[").rstrip("]"))
    local_ports = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local_ports[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    return sum(local_ports.get(inode) == port for inode in inodes)


class PeakFiles:
    """The most descriptors, and sockets, ``server`` held while the block ran (sampled
    every 5 ms); with ``port``, also the most sockets on that port (:func:`sockets_on`,
    looked at when the sockets in all reach a new peak: it reads the kernel's tables)."""

    def __init__(self, server: Served, port: int | None = None) -> None:
        self._server = server
        self._port = port
        self.peak = server.open_files()
        self.sockets = sockets_of(server)
        self.on_port = 0 if port is None else sockets_on(server, port)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self._server.open_files())
            sockets = sockets_of(self._server)
            if self._port is not None and sockets > self.on_port:
                self.on_port = max(self.on_port, sockets_on(self._server, self._port))
            self.sockets = max(self.sockets, sockets)

    def __enter__(self) -> PeakFiles:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def check_in(port: int, token: str | None = None) -> bool:
    client = GrpcioClient(port, token=token)
    try:
        return trio.run(client.check_in, "127.0.0.1:1")
    finally:
        client.close()


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        return check(health_pb2.HealthCheckRequest(), timeout=30).status


def closed_by_server(sock: socket.socket) -> bool:
    """Has the server closed ``sock`` (whatever it sent before)?"""
    sock.setblocking(False)
    try:
        while data := sock.recv(65536):
            del data
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def half_open_streams(port: int, connections: int, streams: int) -> list[RawPeer]:
    """Connections whose every stream sent its HEADERS and one byte of body, then nothing."""
    peers = []
    for _ in range(connections):
        peer = RawPeer(port)
        for _ in range(streams):
            stream_id = peer.open_stream(CHECK_IN)
            peer.h2.send_data(stream_id, b"\0")
        peer.send()
        peers.append(peer)
    return peers


# -- what a closed connection held ---------------------------------------------------------


def test_unfinished_streams_are_released_when_the_peer_closes(
    settings: Settings, served: list[Served]
) -> None:
    """20 connections x 100 streams (HEADERS + 1 byte), then the peer closes: 6 times.

    Before: the coordinator kept the 20 sockets and ~24 MB each time (RSS 69 ->
    177 MB over 5 repeats). The descriptors must be back at once; the memory
    the first attack took stays with Python's allocator and is reused, so the
    baseline is taken after it, and memory must not grow from there.
    """
    # the attack sends no token; no idle timeout during the test, however slow the machine
    server, port, _ = start(settings, served, AUTH_TOKEN=TOKEN, IDLE_CONNECTION_TIMEOUT="0")
    assert check_in(port, TOKEN) is True
    files = settled_files(server)
    memory = server.rss_kib()
    first_rss = None
    for attack in range(6):
        peers = half_open_streams(port, connections=20, streams=100)
        assert wait_until(lambda: server.open_files() >= files + 20, 30), server.open_files()
        for peer in peers:
            peer.close()
        assert wait_until(lambda: server.open_files() <= files, 5), (attack, server.open_files())
        if first_rss is None:
            # the allocator keeps what the first attack took (about 6 MB on this machine)
            first_rss = server.rss_kib()
            assert first_rss - memory < 16 * 1024, (memory, first_rss)
        else:
            assert server.rss_kib() - first_rss < 4 * 1024, (attack, first_rss, server.rss_kib())
    assert check_in(port, TOKEN) is True
    stop(server)


MESSAGE = 4 * 1024 * 1024  # GRPC_MAX_MESSAGE_BYTES's default
#: A method the coordinator does not serve: its messages have only the server's limit (each
#: served one refuses more than 16 KiB from a message's length prefix: test_request_limits.py).
NOT_SERVED = "/FlIntra/NotServed"
MIB = 1024


def window_fillers(port: int, connections: int) -> list[RawPeer]:
    """Connections whose flow-control window (two messages) is full of two half-sent messages."""
    peers = []
    for _ in range(connections):
        peer = RawPeer(port)
        peer.send()
        while peer.h2.outbound_flow_control_window < 2 * MESSAGE - 65535 or (
            peer.h2.remote_settings.initial_window_size < MESSAGE
        ):
            assert peer.receive(), "the server closed a connection before its window opened"
        for _ in range(2):
            stream_id = peer.open_stream(NOT_SERVED)
            # a message that announces MESSAGE bytes and stops short of it
            body = struct.pack(">BI", 0, MESSAGE) + b"\x0a" * (MESSAGE - 1)
            body = body[: peer.h2.local_flow_control_window(stream_id)]
            for start_at in range(0, len(body), 16384):
                peer.h2.send_data(stream_id, body[start_at : start_at + 16384])
            peer.send()
        # The server read it all (frames are read in order) before the next one sends:
        # otherwise, read interleaved, this one's data may look the more stalled.
        peer.h2.ping(b"read all")
        peer.send()
        peer.receive_until(
            lambda events: any(isinstance(e, h2.events.PingAckReceived) for e in events)
        )
        peers.append(peer)
    return peers


def shed(peer: RawPeer) -> bool:
    """Has the server closed ``peer``'s connection? (What it sent, the GOAWAY, is read into h2.)"""
    peer.sock.setblocking(False)
    try:
        while peer.receive():
            pass
    except BlockingIOError:
        return False
    return True


def not_served(port: int, size: int) -> grpc.StatusCode:
    """A call of ``size`` bytes to :data:`NOT_SERVED` over grpcio: the status code the server
    answered with (UNIMPLEMENTED, once it read the whole message)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            NOT_SERVED, request_serializer=lambda request: request, response_deserializer=bytes
        )
        try:
            call(b"x" * size, timeout=60)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK


def test_half_sent_messages_hold_at_most_the_budget_and_memory_comes_back(
    settings: Settings, served: list[Served]
) -> None:
    """20 connections fill their 8 MiB windows with half-sent messages, over a 16 MiB budget.

    Before: each connection held its whole window (about 8.5 MB of RSS each,
    160 MiB here) for as long as it sent HEADERS+RST now and then, and the
    memory stayed with the allocator after the peers closed. Now the process
    holds at most the budget (the most stalled connections are closed with
    GOAWAY ENHANCE_YOUR_CALM), a whole message of almost
    GRPC_MAX_MESSAGE_BYTES still gets its answer while the attackers hold
    their share, and RSS comes back near its baseline once the peers close.
    (Attackers and message go to a method not served: every served one
    refuses more than 16 KiB from the length prefix.)
    """
    budget = 16 * 1024 * 1024
    server, port, _ = start(
        settings,
        served,
        GRPC_MAX_BUFFERED_BYTES=str(budget),
        IDLE_CONNECTION_TIMEOUT="0",  # only the budget closes them, however slow the machine
    )
    # warm up what a large message costs once (parsing, grpcio's answer), then the baseline
    assert not_served(port, MESSAGE - 64) == grpc.StatusCode.UNIMPLEMENTED
    assert check_in(port) is True
    baseline = server.rss_kib()

    attackers = window_fillers(port, 20)
    # the budget holds two full windows: the other 18 are closed, the two kept
    assert wait_until(lambda: sum(map(shed, attackers)) >= 18, 30)
    held = server.rss_kib() - baseline
    assert held < budget // 1024 + 24 * MIB, (baseline, held)  # 160 MiB before

    # a message of almost 4 MiB is read whole and answered (UNIMPLEMENTED: no such method);
    # the most stalled attacker makes room for it
    assert not_served(port, MESSAGE - 64) == grpc.StatusCode.UNIMPLEMENTED
    kept = [peer for peer in attackers if not shed(peer)]
    assert len(kept) == 1, len(kept)
    goaways = [peer.goaway() for peer in attackers if peer.goaway() is not None]
    assert goaways and all(
        g.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM for g in goaways
    ), goaways

    for peer in attackers:
        peer.close()
    assert wait_until(lambda: server.rss_kib() - baseline < 8 * MIB, 10), (
        baseline,
        server.rss_kib(),
    )
    log = stop(server)
    assert "over GRPC_MAX_BUFFERED_BYTES=16777216" in log
    assert "Traceback" not in log


# -- the process's descriptor limit -------------------------------------------------------


def test_under_256_descriptors_bursts_and_idle_connections_cost_no_service(
    settings: Settings, served: list[Served]
) -> None:
    """prlimit --nofile=256: 1,000 connections opened and closed, then 300 held idle.

    Before: EMFILE from accept ended the process. Each port now keeps its share
    of three quarters of the limit (96 of 256): the gRPC port closes its least
    recently active connections to make room, the status port refuses at once,
    and the check-in and the health check made meanwhile are answered.
    """
    server, port, status_url = start(settings, served, open_files=256, HANDSHAKE_TIMEOUT="1")
    status_port = int(urlsplit(status_url).port or 0)
    files = server.open_files()
    with PeakFiles(server) as peak:
        burst = [socket.create_connection(("127.0.0.1", port)) for _ in range(1000)]
        for sock in burst:
            sock.close()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        idle_status = [socket.create_connection(("127.0.0.1", status_port)) for _ in range(300)]
        assert check_in(port) is True  # while 600 idle connections are held
        assert health(port) == health_pb2.HealthCheckResponse.SERVING
        assert wait_until(lambda: sum(map(closed_by_server, idle)) >= 300 - 96, 30)
        # the status port closed the extra ones at once, the others after HANDSHAKE_TIMEOUT
        assert wait_until(lambda: all(map(closed_by_server, idle_status)), 30)
    assert server.process.poll() is None
    assert peak.peak <= files + 2 * 96 + 8, (files, peak.peak)
    assert '"stage"' in trio.run(first_status, status_url)  # the status port serves again
    for sock in idle + idle_status:
        sock.close()
    log = stop(server)
    limit_lines = [line for line in log.splitlines() if "connections open" in line]
    assert 1 <= len(limit_lines) <= 2, limit_lines  # per port, once per interval
    assert "Traceback" not in log


def test_under_64_descriptors_with_metrics_two_selectors_keep_their_connections(
    settings: Settings, served: list[Served]
) -> None:
    """prlimit --nofile=64, three ports: each port's part of the 32 descriptors is 10.

    Before: the 9 a port keeps for connections closing to make room left it 1,
    so a second selector's connection closed the first one's (a call in flight
    on it would have been cancelled). The closing allowance now shrinks with
    the part: the first selector's second call is answered on its connection.
    """
    server, port, _ = start(settings, served, open_files=64, METRICS_PORT="0")
    first = RawPeer(port)
    assert first.call(CHECK_IN, check_in_body("127.0.0.1:1"))["grpc-status"] == "0"
    second = RawPeer(port)
    assert second.call(CHECK_IN, check_in_body("127.0.0.1:2"))["grpc-status"] == "0"
    assert first.call(CHECK_IN, check_in_body("127.0.0.1:1"))["grpc-status"] == "0"
    assert first.goaway() is None
    first.close()
    second.close()
    log = stop(server)
    assert "descriptors for 8 connections per port (MAX_CONNECTIONS=1000), and 1 closing" in log


async def first_status(url: str) -> str:
    with trio.fail_after(30):
        async with trio_websocket.open_websocket_url(url) as ws:
            return str(await ws.get_message())


def test_go_selector_check_ins_never_closed_stay_within_the_limit(
    settings: Settings, served: list[Served]
) -> None:
    """2,000 check-ins the Go selector's way: a new connection per call, never closed.

    Before: 1,500 of them held 1,511 descriptors and 124 MB; with 1,024 the
    process would have crashed. Every call is answered, and the coordinator
    holds at most this port's share of 256 descriptors (96, MAX_CONNECTIONS=100
    is more) for those connections, the ones closing to make room included (before
    they were not counted: 3-5 more, 123 descriptors where 122 were allowed).
    """
    server, port, _ = start(settings, served, open_files=256, MAX_CONNECTIONS="100")
    files, listening = server.open_files(), sockets_on(server, port)
    kept: list[RawPeer] = []
    answers = []
    with PeakFiles(server, port) as peak:
        for number in range(2000):
            peer = RawPeer(port)
            answers.append(peer.call(CHECK_IN, check_in_body(f"127.0.0.1:{1 + number % 50}")))
            kept.append(peer)  # never closed, as the Go selector does
    assert [answer["grpc-status"] for answer in answers] == ["0"] * 2000
    assert server.process.poll() is None
    share = sum(port_share(2, 256)) + 1  # open, closing, its spare
    assert share == 96
    # The port's sockets (the round's GoalCountReached dials its own, outgoing, meanwhile)
    assert peak.on_port <= listening + share, (listening, peak.on_port, peak.sockets)
    # 4: files opened meanwhile (the journal's next version, rounds.jsonl); 2: GoalCountReached
    # dialling its selectors (none listens; it retries), within its own budget
    assert peak.peak <= files + share + 4 + 2, (files, peak.peak)
    # closed by the coordinator (GOAWAY) to make room, least recently active first
    assert sum(closed_by_server(peer.sock) for peer in kept[:1000]) >= 1000 - 96
    for peer in kept:
        peer.close()
    stop(server)


def test_out_of_descriptors_connections_are_closed_at_once_and_service_resumes(
    tmp_path: Path,
) -> None:
    """A listener whose limit is above its descriptors (64): accept fails with EMFILE.

    Connections beyond the descriptors are accepted with the reserve descriptor
    and closed at once (not left waiting in the backlog), the process lives on,
    one line is logged, and calls are answered as soon as descriptors are free.
    """
    script = HERE / "helpers" / "emfile_server.py"
    stderr = (tmp_path / "stderr").open("w+")
    process = subprocess.Popen(
        ["prlimit", "--nofile=64", "--", sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
        # ~55 fit in 64 descriptors; the rest are closed by the server, not left hanging
        assert wait_until(lambda: sum(map(closed_by_server, held)) >= 30, 30)
        assert process.poll() is None
        assert len(os.listdir(f"/proc/{process.pid}/fd")) <= 64
        for sock in held:
            sock.close()
        descriptors = f"/proc/{process.pid}/fd"  # until the server has closed its ends:
        assert wait_until(lambda: len(os.listdir(descriptors)) < 20, 30)
        peer = RawPeer(port)
        assert peer.call(CHECK_IN, check_in_body("127.0.0.1:1"))["grpc-status"] == "0"
        peer.close()
    finally:
        process.kill()
        process.wait()
    stderr.seek(0)
    lines = [line for line in stderr if "cannot accept connections" in line]
    assert len(lines) == 1, lines  # once per interval, not once per connection
    assert "Too many open files" in lines[0]


class Flood:
    """Threads that dial ``port`` over and over until stopped: each sends HTTP/2's preface
    and SETTINGS only, on ``burst`` connections at once, then waits for the server's
    SETTINGS on each before the next burst (the dials were accepted: the backlog stays
    short, other clients' dials go through). Each thread keeps its last 64 connections
    open; the server closes most of them first, to make room."""

    def __init__(self, port: int, threads: int = 4, burst: int = 8) -> None:
        self._port = port
        self._burst = burst
        self._stop = threading.Event()
        self.dials = 0
        self._threads = [threading.Thread(target=self._dial, daemon=True) for _ in range(threads)]

    def _connect(self) -> RawPeer | None:
        try:
            peer = RawPeer(self._port)
            peer.send()
        except OSError:  # refused, or closed by the server meanwhile
            return None
        self.dials += 1
        return peer

    def _dial(self) -> None:
        held: list[RawPeer] = []
        while not self._stop.is_set():
            burst = [peer for _ in range(self._burst) if (peer := self._connect()) is not None]
            for peer in burst:
                with contextlib.suppress(OSError):
                    peer.receive()  # the server's SETTINGS (or its GOAWAY, or the end)
            held.extend(burst)
            while len(held) > 64:
                held.pop(0).close()
        for peer in held:
            peer.close()

    def __enter__(self) -> Flood:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def health_with(port: int, padding: int, timeout: float) -> int | str:
    """A health check on a connection of its own (grpcio), its request carrying ``padding``
    bytes in a field the server does not know (and skips): the status, or the error's code
    and what grpcio saw (its details say how the call ended: a reset, a GOAWAY...)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda request: padded(request, padding),
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            return check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"


#: A check caught in grpcio's livelock (see the test) is made again, this many times at most.
_LIVELOCKS = 5


def health_checks(port: int, padding: int, count: int) -> list[int | str]:
    """``count`` answers of :func:`health_with`; a check that times out (10 s) is made again
    on a new channel, :data:`_LIVELOCKS` times at most, and one that grpcio ends UNAVAILABLE
    after a GOAWAY once at most (then the error is the answer)."""
    answers: list[int | str] = []
    again, unavailable = _LIVELOCKS, 1
    while len(answers) < count:
        answer = health_with(port, padding, timeout=10)
        if str(answer).startswith("DEADLINE_EXCEEDED") and again > 0:
            again -= 1
            continue
        if str(answer).startswith("UNAVAILABLE") and "GOAWAY" in str(answer) and unavailable:
            unavailable -= 1
            continue
        answers.append(answer)
    return answers


@pytest.mark.parametrize("cap", [4, 8])
@pytest.mark.parametrize("padding", [0, 16_000])
def test_calls_in_flight_are_answered_under_a_flood_of_dials_at_a_small_cap(
    settings: Settings, served: list[Served], cap: int, padding: int
) -> None:
    """100 grpcio health checks, each on a new connection (small, and carrying 16 KB, as
    much as Check's own limit lets it), while four threads dial the gRPC port (HTTP/2 preface
    only, 8 at once) at MAX_CONNECTIONS=4 and 8: every check is answered SERVING, and the
    coordinator holds at most ``cap`` open and CLOSING_MAX closing connections.

    Before: a dial closed the least recently active connection, often the health
    check's, and its call (or its request, half in) was cancelled on the spot: answered
    2-7/100 (cap 4) and 92-95/100 (cap 8) small, 0-2/100 and 92-93/100 with 200 KB. (A request
    beyond grpcio's retry buffer, 256 KiB, can still fail: when its connection is cut
    before its first byte is read, grpcio cannot send it again; 1 MB: 82-97/100 at 4.)

    grpcio (1.85.3) has a livelock of its own here (one check of the 400 in about half of
    the full suite's runs on this machine, never alone): when the server's SETTINGS and both
    GOAWAYs of a connection closed to make room, then hurried, reach grpcio in one read
    (before its subchannel has taken the new connection), grpcio reports the channel READY
    and sends the check on that closed transport again and again (transparent retries: 1.8
    million lines of its http trace in 30 s), while the transport's close waits for a write
    queued behind them. The check ends DEADLINE_EXCEEDED, none of it sent (the server saw no
    request left unanswered). Such a check is made again on a new channel, at most five
    times in a hundred. Once in a hundred, so is a check grpcio ended UNAVAILABLE "Stream
    removed (GOAWAY received)": seen once in three clean-clone runs, its cause not traced
    yet (grpcio may give up its transparent retry after a second GOAWAY). A server that cut
    calls (above: 5 to 8 of 100 at cap 8) still fails the test.
    """
    server, port, _ = start(settings, served, MAX_CONNECTIONS=str(cap))
    sockets = sockets_of(server)
    with PeakFiles(server) as peak, Flood(port) as flood:
        answers = health_checks(port, padding, 100)
    assert flood.dials >= 200, flood.dials  # the checks were made under the flood
    assert answers == [health_pb2.HealthCheckResponse.SERVING] * 100, collections.Counter(answers)
    # (a closing connection is counted until its socket is closed: CLOSING_MAX of them)
    assert peak.sockets <= sockets + cap + port_share(2).closing, (sockets, peak.sockets)
    assert server.process.poll() is None
    stop(server)


# -- the log ------------------------------------------------------------------------------


def log_growth(server: Served, before: int) -> tuple[int, str]:
    """Bytes the log grew by since ``before`` lines, and that part of it (process stopped)."""
    stop(server)
    grown = "".join(server.lines[before:])
    return len(grown.encode()), grown


def test_huge_selector_ids_do_not_flood_the_log(settings: Settings, served: list[Served]) -> None:
    """10 ClientCountUpdate calls with a 3 MiB selector id (31 MB of log before; now refused
    from the message's length prefix, RESOURCE_EXHAUSTED), and 10 with a 16,000-character id
    (within the method's limit; refused as an id)."""
    server, port, _ = start(settings, served)
    before = len(server.lines)
    client = GrpcioClient(port)
    try:
        for index in range(10):
            with pytest.raises(grpc.RpcError) as refused:
                trio.run(client.check_in, f"{index}" * (3 * 1024 * 1024))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert trio.run(client.check_in, f"{index}" * 16_000) is False
    finally:
        client.close()
    grown, text = log_growth(server, before)
    assert grown < LOG_BOUND, grown
    assert "16000 chars" in text  # the line says how long the id was


def test_rapid_resets_do_not_flood_the_log(settings: Settings, served: list[Served]) -> None:
    """30,000 HEADERS + RST_STREAM: 2.3 MB of purerpc warnings before."""
    server, port, _ = start(settings, served)
    before = len(server.lines)
    peer = RawPeer(port)
    for _ in range(30):
        for _ in range(1000):
            peer.reset(peer.open_stream(CHECK_IN))
        peer.send()
    # Frames are handled in order: once this call is answered, all resets were.
    assert peer.call(CHECK_IN, check_in_body("127.0.0.1:2"))["grpc-status"] == "0"
    peer.close()
    assert check_in(port) is True
    grown, text = log_growth(server, before)
    assert grown < LOG_BOUND, grown
    assert "Got exception" not in text


def break_and_leave(port: int, connections: int) -> None:
    """``connections`` times: dial, break the protocol (HEADERS on a stream id a client may
    not open), read the server's first bytes, close at once (its GOAWAY unread: a reset)."""
    for _ in range(connections):
        with contextlib.suppress(OSError):
            peer = RawPeer(port)
            peer.send()
            peer.sock.sendall(HeadersFrame(2, data=b"\x82", flags=["END_HEADERS"]).serialize())
            peer.sock.recv(16)
            peer.close()


def test_peers_that_reset_while_told_to_go_end_only_their_own_connection(
    settings: Settings, served: list[Served]
) -> None:
    """4 threads x 600 peers break the protocol and reset their connection while the server
    says goodbye (the GOAWAY sent, the connection being shut down): no connection's task
    fails (no "handler failed" in the log), and a check-in is answered after.

    Before: ``shutdown`` of a connection reset meanwhile raised ENOTCONN out of the
    connection's task (anyio does not convert it): logged as a handler failure, with a
    traceback, 1-2 per 4 s of such a flood."""
    server, port, _ = start(settings, served, MAX_CONNECTIONS="8")
    threads = [threading.Thread(target=break_and_leave, args=(port, 600)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    peer = RawPeer(port)
    peer.send()
    assert peer.call(CHECK_IN, check_in_body("127.0.0.1:3"))["grpc-status"] == "0"
    peer.close()
    log = stop(server)
    assert log.count("handler failed") == 0, log
