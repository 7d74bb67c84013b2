"""The gRPC port's connections under our rules: idle ones closed, room made, limits per connection.

A coordinator on loopback (in process); peers are raw HTTP/2 connections
(``helpers.h2peer``, in worker threads: they block) and grpcio.
"""

from __future__ import annotations

import functools
import gzip
import math
import select
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from helpers.h2peer import CHECK_IN, RawPeer, check_in_body
from helpers.peers import GrpcioClient
from helpers.pki import Pki, tls_settings
from helpers.relay import relay

from fl_coordinator._proto import fl_intra_pb2
from fl_coordinator.app import serve
from fl_coordinator.config import Settings
from fl_coordinator.connections import port_share
from fl_coordinator.rpc.connection import GOODBYE_TIMEOUT, MAX_CONCURRENT_STREAMS

#: A method the coordinator does not serve: its requests have only the server's limit.
NOT_SERVED = "/FlIntra/NotServed"


async def connected(port: int) -> RawPeer:
    """A raw connection that has sent its preface and SETTINGS, and nothing else."""
    peer = await trio.to_thread.run_sync(RawPeer, port)
    await trio.to_thread.run_sync(peer.send)
    return peer


async def test_idle_connection_is_closed_with_goaway(
    settings: Settings, nursery: trio.Nursery
) -> None:
    endpoints = await nursery.start(serve, settings.replace(idle_connection_timeout=0.5))
    peer = await connected(endpoints.grpc_port)
    answer = await trio.to_thread.run_sync(peer.call, CHECK_IN, check_in_body("127.0.0.1:1"))
    assert answer["grpc-status"] == "0"
    waited = await trio.to_thread.run_sync(peer.wait_closed, 60)
    goaway = peer.goaway()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == 1  # the call it answered
    assert waited >= 0.4  # not before the idle time (counted from the answer)
    peer.close()


def park_and_reset(peer: RawPeer, limit: float) -> float:
    """Park part of a message, then HEADERS + RST_STREAM every 0.1 s: seconds until closed."""
    stream_id = peer.open_stream(CHECK_IN)
    peer.h2.send_data(stream_id, struct.pack(">BI", 0, 1000) + b"\x0a" * 10)
    peer.send()
    peer.sock.settimeout(0.1)
    started = time.monotonic()
    while time.monotonic() - started < limit:
        try:
            if peer.goaway() is None:
                peer.reset(peer.open_stream(CHECK_IN))
                peer.send()
            if not peer.receive():
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
    return math.inf


async def test_half_sent_messages_and_resets_are_not_call_traffic(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """Parked data with HEADERS+RST now and then is idle (before: kept open forever)."""
    endpoints = await nursery.start(serve, settings.replace(idle_connection_timeout=0.5))
    peer = await connected(endpoints.grpc_port)
    waited = await trio.to_thread.run_sync(park_and_reset, peer, 30)
    assert waited < 30
    goaway = peer.goaway()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    peer.close()


async def test_a_full_port_closes_its_least_recently_active_connection(
    settings: Settings, nursery: trio.Nursery
) -> None:
    endpoints = await nursery.start(serve, settings.replace(max_connections=3))
    port = endpoints.grpc_port
    oldest, middle, newest = [await connected(port) for _ in range(3)]  # accepted in order
    # A fourth connection makes room: the oldest one is closed, with a GOAWAY...
    client = GrpcioClient(port)
    assert await client.check_in("127.0.0.1:1") is True
    assert await trio.to_thread.run_sync(oldest.wait_closed, 60) < 60
    goaway = oldest.goaway()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    # ... and the others go on.
    for peer, selector_id in ((newest, "127.0.0.1:2"), (middle, "127.0.0.1:3")):
        answer = await trio.to_thread.run_sync(peer.call, CHECK_IN, check_in_body(selector_id))
        assert answer["grpc-status"] == "0"
    client.close()
    for peer in (oldest, middle, newest):
        peer.close()


async def ends_alone(peer: RawPeer, port: int, code: h2.errors.ErrorCodes) -> None:
    """Send what ``peer`` queued: its connection ends with a GOAWAY ``code``, others go on."""
    await trio.to_thread.run_sync(peer.send)
    assert await trio.to_thread.run_sync(peer.wait_closed, 60) < 60
    goaway = peer.goaway()
    assert goaway is not None and goaway.error_code == code
    client = GrpcioClient(port)
    assert await client.check_in("127.0.0.1:1") is True
    client.close()
    peer.close()


async def test_too_many_streams_end_that_connection_only(
    settings: Settings, nursery: trio.Nursery
) -> None:
    endpoints = await nursery.start(serve, settings)
    greedy = await connected(endpoints.grpc_port)
    for _ in range(MAX_CONCURRENT_STREAMS + 1):
        stream_id = greedy.open_stream(CHECK_IN)
        greedy.h2.send_data(stream_id, b"\0")
    await ends_alone(greedy, endpoints.grpc_port, h2.errors.ErrorCodes.PROTOCOL_ERROR)


async def test_oversized_headers_end_that_connection_only(
    settings: Settings, nursery: trio.Nursery
) -> None:
    endpoints = await nursery.start(serve, settings)
    bloated = await connected(endpoints.grpc_port)
    bloat = (("x-bloat", "b" * 100_000),)  # h2 accepts 64 KiB of headers
    bloated.open_stream(CHECK_IN, check_in_body("127.0.0.1:1"), end=True, metadata=bloat)
    await ends_alone(bloated, endpoints.grpc_port, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


async def test_unimplemented_method_and_a_second_message_are_answered_not_logged(
    settings: Settings, nursery: trio.Nursery, caplog
) -> None:
    endpoints = await nursery.start(serve, settings)
    peer = await connected(endpoints.grpc_port)
    long_path = "/FlIntra/" + "x" * 5000
    unknown = await trio.to_thread.run_sync(peer.call, long_path, check_in_body("127.0.0.1:1"))
    assert unknown["grpc-status"] == "12"  # UNIMPLEMENTED
    assert len(unknown["grpc-message"]) < 600  # the path is cut
    twice = check_in_body("127.0.0.1:1") * 2
    broken = await trio.to_thread.run_sync(peer.call, CHECK_IN, twice)
    assert broken["grpc-status"] == "13"  # INTERNAL: a unary call with two messages
    peer.close()
    assert "x" * 300 not in caplog.text
    assert [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")] == []


async def test_calls_reset_after_their_message_give_back_the_connection_window(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """A message the peer reset before its call read it must not use up the window for good.

    purerpc gives the window back as a call reads each message; with small
    messages the connection's window is HTTP/2's 64 KiB, which 5,000 reset
    calls of 20 bytes would use up: the peer would then wait for ever.
    """
    settings = settings.replace(grpc_max_message_bytes=64)
    endpoints = await nursery.start(serve, settings)
    peer = await connected(endpoints.grpc_port)
    body = check_in_body("127.0.0.1:1")

    def reset_calls_then_call() -> dict[str, str]:
        for _ in range(5000):
            stream_id = peer.open_stream(CHECK_IN)
            peer.send_data_when_allowed(stream_id, body)
            peer.reset(stream_id)
        peer.send()
        return peer.call(CHECK_IN, check_in_body("127.0.0.1:2"))

    assert (await trio.to_thread.run_sync(reset_calls_then_call))["grpc-status"] == "0"
    peer.close()


#: gRPC's message encodings that purerpc reads: gzip (RFC 1952) and deflate (RFC 1950).
COMPRESSIONS: tuple[tuple[str, Callable[[bytes], bytes]], ...] = (
    ("gzip", gzip.compress),
    ("deflate", zlib.compress),
)


def compressed(body: bytes, compress: Callable[[bytes], bytes]) -> bytes:
    """A gRPC message of ``body``'s message, compressed (the flag set)."""
    data = compress(body[5:])
    return struct.pack(">BI", 1, len(data)) + data


async def test_a_compressed_message_inflating_past_the_limit_ends_that_connection_only(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """GRPC_MAX_MESSAGE_BYTES bounds what a message inflates to, not only what it weighs.

    purerpc inflated a message whole, on the event loop, before any call started:
    1 MB of deflate stream took 2 GB of memory and froze the loop for 19 s.
    Here 1 MiB of zeros (1 KiB compressed) against a limit of 64 KiB, to a method not
    served (the served ones have smaller limits of their own: test_request_limits.py).
    """
    settings = settings.replace(grpc_max_message_bytes=65536)
    endpoints = await nursery.start(serve, settings)
    zeros = struct.pack(">BI", 0, 1 << 20) + bytes(1 << 20)
    for encoding, compress in COMPRESSIONS:
        bomber = await connected(endpoints.grpc_port)
        metadata = (("grpc-encoding", encoding),)
        body = compressed(zeros, compress)
        bomber.open_stream(NOT_SERVED, body, end=True, metadata=metadata)
        await ends_alone(bomber, endpoints.grpc_port, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


async def test_compressed_messages_within_the_limit_are_answered(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """gRPC's ``gzip`` (RFC 1952, what grpcio sends) and ``deflate`` (RFC 1950) both work."""
    endpoints = await nursery.start(serve, settings)
    peer = await connected(endpoints.grpc_port)
    for n, (encoding, compress) in enumerate(COMPRESSIONS):
        body = compressed(check_in_body(f"127.0.0.1:{n + 1}"), compress)
        metadata = (("grpc-encoding", encoding),)
        answer = await trio.to_thread.run_sync(peer.call, CHECK_IN, body, metadata)
        assert answer["grpc-status"] == "0"
    peer.close()


# -- a graceful close: the calls in flight finish ------------------------------------------


def ends(stream_id: int, kind: type) -> Callable[[list[h2.events.Event]], bool]:
    """A condition on a peer's events: an event of ``kind`` came on ``stream_id``."""
    return lambda events: any(isinstance(e, kind) and e.stream_id == stream_id for e in events)


def goaways(peer: RawPeer) -> list[h2.events.ConnectionTerminated]:
    return [e for e in peer.events if isinstance(e, h2.events.ConnectionTerminated)]


def call_waiting_for_window(port: int) -> tuple[RawPeer, int]:
    """A check-in whose answer waits: the peer's window is 0, so only its headers came."""
    peer = RawPeer(port)
    peer.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    stream_id = peer.open_stream(CHECK_IN, check_in_body("127.0.0.1:1"), end=True)
    peer.send()
    peer.receive_until(ends(stream_id, h2.events.ResponseReceived))
    return peer, stream_id


def request_without_message(port: int) -> tuple[RawPeer, int]:
    """A check-in whose headers the server took in (a PING's answer says so), no message."""
    return headers_only(RawPeer(port))


def headers_only(peer: RawPeer) -> tuple[RawPeer, int]:
    """On ``peer``: a check-in whose headers the server took in (a PING's answer says so)."""
    stream_id = peer.open_stream(CHECK_IN)
    peer.h2.ping(b"in order")
    peer.send()
    peer.receive_until(lambda events: any(isinstance(e, h2.events.PingAckReceived) for e in events))
    return peer, stream_id


def sees_both_goaways(peer: RawPeer) -> list[h2.events.ConnectionTerminated]:
    """Read until the second GOAWAY (the first one's PING is answered on the way)."""
    peer.receive_until(lambda events: len(goaways(peer)) >= 2)
    assert len(goaways(peer)) == 2, (goaways(peer), peer.closed_by_server)
    return goaways(peer)


def refused(peer: RawPeer) -> h2.events.StreamReset:
    """Open a check-in on ``peer``: how the server ended it."""
    stream_id = peer.open_stream(CHECK_IN, check_in_body("127.0.0.1:2"), end=True)
    peer.send()
    peer.receive_until(ends(stream_id, h2.events.StreamReset))
    assert not ends(stream_id, h2.events.ResponseReceived)(peer.events)  # it did not run
    resets = [e for e in peer.events if ends(stream_id, h2.events.StreamReset)([e])]
    assert len(resets) == 1, (resets, peer.closed_by_server)
    return resets[0]


async def test_a_call_in_flight_on_a_connection_closed_to_make_room_is_answered(
    settings: Settings, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """At MAX_CONNECTIONS=1, a check-in waits to send its answer when a second dial
    closes its connection: a GOAWAY that leaves out no stream and a PING, then, the PING
    answered, a GOAWAY naming the check-in's stream; a stream opened after it is refused
    (REFUSED_STREAM, not run), and the check-in's answer (accepted) arrives once the peer
    reads. Then the server closes. (Time stands still: no timeout is involved.)

    Before: one GOAWAY, the check-in cancelled at once, its stream reset, no answer.
    """
    endpoints = await nursery.start(
        serve, settings.replace(max_connections=1, idle_connection_timeout=0)
    )
    port = endpoints.grpc_port
    peer, stream_id = await trio.to_thread.run_sync(call_waiting_for_window, port)
    other = await connected(port)  # closes the peer's connection to make room
    first, last = await trio.to_thread.run_sync(sees_both_goaways, peer)
    assert (first.error_code, first.last_stream_id) == (h2.errors.ErrorCodes.NO_ERROR, 2**31 - 1)
    assert (last.error_code, last.last_stream_id) == (h2.errors.ErrorCodes.NO_ERROR, stream_id)
    reset = await trio.to_thread.run_sync(refused, peer)
    assert reset.error_code == h2.errors.ErrorCodes.REFUSED_STREAM

    def read_the_answer() -> tuple[bytes, dict[str, str]]:
        peer.h2.increment_flow_control_window(65535, stream_id=stream_id)
        peer.send()
        peer.receive_until(ends(stream_id, h2.events.TrailersReceived))
        data = b"".join(e.data for e in peer.events if ends(stream_id, h2.events.DataReceived)([e]))
        trailers = next(e for e in peer.events if ends(stream_id, h2.events.TrailersReceived)([e]))
        return data, dict(trailers.headers)

    data, trailers = await trio.to_thread.run_sync(read_the_answer)
    assert trailers["grpc-status"] == "0"
    assert fl_intra_pb2.FlClientStatus.FromString(data[5:]) == fl_intra_pb2.FlClientStatus(
        accepted=True
    )
    assert await trio.to_thread.run_sync(peer.wait_closed, 60) < 60  # its calls done: closed
    peer.close()
    other.close()


@pytest.mark.parametrize(
    ("hold", "started"), [(call_waiting_for_window, True), (request_without_message, False)]
)
async def test_a_connection_that_never_finishes_its_call_closes_at_the_bound(
    settings: Settings,
    nursery: trio.Nursery,
    mock_clock: trio.testing.MockClock,
    hold: Callable[[int], tuple[RawPeer, int]],
    started: bool,
) -> None:
    """A peer that keeps its connection draining (does not read its answer, or never sends
    its request's message, and opens streams after the GOAWAY): the connection is still
    open (a PING is answered) just before GOODBYE_TIMEOUT from the first GOAWAY, and closed
    at it, without the call's answer (on trio's MockClock: no real time involved). A last
    GOAWAY names the call if it started, else stream 0, and refuses the request that never
    started (REFUSED_STREAM: grpcio would send it again).

    Before: closed after the second GOAWAY, which named the request as taken in."""
    endpoints = await nursery.start(
        serve, settings.replace(max_connections=1, idle_connection_timeout=0)
    )
    port = endpoints.grpc_port
    peer, stream_id = await trio.to_thread.run_sync(hold, port)
    other = await connected(port)  # closes the peer's connection to make room
    await trio.to_thread.run_sync(sees_both_goaways, peer)
    for _ in range(3):
        reset = await trio.to_thread.run_sync(refused, peer)
        assert reset.error_code == h2.errors.ErrorCodes.REFUSED_STREAM

    mock_clock.jump(GOODBYE_TIMEOUT - 0.01)
    assert await trio.to_thread.run_sync(peer.answers_a_ping) is True
    mock_clock.jump(0.02)
    assert await trio.to_thread.run_sync(peer.wait_closed, 60) < 60
    assert not ends(stream_id, h2.events.TrailersReceived)(peer.events)  # cut: no answer
    assert goaways(peer)[-1].last_stream_id == (stream_id if started else 0)
    resets = [e.error_code for e in peer.events if ends(stream_id, h2.events.StreamReset)([e])]
    assert resets.count(h2.errors.ErrorCodes.REFUSED_STREAM) == (0 if started else 1), resets
    peer.close()
    other.close()


def heard_out(peer: RawPeer) -> bool:
    """Read (answering nothing) until the server closes: whether with a FIN, not a reset."""
    while True:
        try:
            data = peer.sock.recv(65536)
        except ConnectionResetError:
            return False
        if not data:
            return True
        peer.events.extend(peer.h2.receive_data(data))


def over_tls(port: int, pki: Pki) -> RawPeer:
    """A raw connection over TLS (the handshake done: the server accepted it), its preface
    and SETTINGS sent."""
    peer = RawPeer(port)
    peer.sock = pki.client_context().wrap_socket(peer.sock, server_hostname="127.0.0.1")
    peer.send()
    return peer


@pytest.mark.parametrize("tls", [False, True])
async def test_a_connection_hurried_to_make_room_says_which_calls_never_started(
    settings: Settings,
    nursery: trio.Nursery,
    mock_clock: trio.testing.MockClock,
    pki: Pki,
    tls: bool,
) -> None:
    """At MAX_CONNECTIONS=1, a check-in's headers are in, not its message, when a dial
    closes its connection to make room; more dials fill the connections closing (none
    answers its PING: their goodbyes would last GOODBYE_TIMEOUT), and the next one makes
    the gate hurry the oldest without a call in flight, the check-in's. Its peer hears
    the check-in refused (REFUSED_STREAM) and a last GOAWAY naming stream 0 (no call
    started), then the connection's end, a FIN: grpcio sends such a call again. (Time
    stands still: no timeout is involved.)

    Before: the connection was closed after the first GOAWAY, which leaves out no
    stream: grpcio took the call as started and cut, and ended it UNAVAILABLE (1 health
    check in 100 under a flood of dials at MAX_CONNECTIONS=8). Over TLS too: what the
    peer sent is dropped beneath TLS, from the socket."""
    limits = {"max_connections": 1, "idle_connection_timeout": 0}
    served = tls_settings(settings, pki, **limits) if tls else settings.replace(**limits)
    endpoints = await nursery.start(serve, served)
    port = endpoints.grpc_port

    def dial() -> RawPeer:
        if tls:
            return over_tls(port, pki)
        peer = RawPeer(port)
        peer.send()
        return peer

    holder, stream_id = await trio.to_thread.run_sync(lambda: headers_only(dial()))
    dials = [await trio.to_thread.run_sync(dial) for _ in range(port_share(2).closing + 1)]
    assert await trio.to_thread.run_sync(heard_out, holder) is True
    resets = [e.error_code for e in holder.events if ends(stream_id, h2.events.StreamReset)([e])]
    assert resets == [h2.errors.ErrorCodes.REFUSED_STREAM]
    codes = [(goaway.error_code, goaway.last_stream_id) for goaway in goaways(holder)]
    assert codes == [(h2.errors.ErrorCodes.NO_ERROR, 2**31 - 1), (h2.errors.ErrorCodes.NO_ERROR, 0)]
    # the newest dial was admitted: its check-in is answered
    answer = await trio.to_thread.run_sync(dials[-1].call, CHECK_IN, check_in_body("127.0.0.1:2"))
    assert answer["grpc-status"] == "0"
    for peer in (holder, *dials):
        peer.close()


def unread(port: int) -> socket.socket:
    """A connection whose server is stuck writing to it: PINGs, their answers never read,
    until the server stops reading it (more than MAX_UNSENT_BYTES of answers wait: its
    writer cannot send). The peer's receive buffer is 1 KiB and its segments 88 bytes, so
    that the server's send buffer stays small, as off loopback. The server is taken to have
    stopped once nothing more goes for 5 s (it reads megabytes a second meanwhile)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 88)
    sock.connect(("127.0.0.1", port))
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    pings = b"".join(b"\0\0\x08\x06\0\0\0\0\0" + struct.pack(">Q", n) for n in range(4096))
    pending = memoryview(connection.data_to_send())
    sock.setblocking(False)
    while select.select([], [sock], [], 5)[1]:
        pending = pending[sock.send(pending) :] or memoryview(pings)
    return sock


async def test_a_hurried_connection_whose_peer_does_not_read_is_closed_at_once(
    settings: Settings, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """At MAX_CONNECTIONS=1, a peer that sends PINGs and never reads their answers (the
    server's writer cannot send) is closed to make room, more dials fill the connections
    closing, and the next one makes the gate hurry it: its last GOAWAY cannot leave, so it
    is closed at once, and the newest dial is admitted and answered. (Time stands still.)

    Before: the hurried connection waited LAST_WORD_TIMEOUT for its writer, and the gate
    for it: a peer that does not read made each hurry, and so each accept under a flood of
    dials, take 0.1 s (grpcio health checks on new connections against 10 such dials a
    second: 14.5 a second answered, 81 before the last word was said at all)."""
    endpoints = await nursery.start(
        serve, settings.replace(max_connections=1, idle_connection_timeout=0)
    )
    port = endpoints.grpc_port
    stuck = await trio.to_thread.run_sync(unread, port)
    dials = [await connected(port) for _ in range(port_share(2).closing + 1)]
    dials[-1].sock.settimeout(10)
    answer = await trio.to_thread.run_sync(dials[-1].call, CHECK_IN, check_in_body("127.0.0.1:2"))
    assert answer["grpc-status"] == "0"
    stuck.close()
    for peer in dials:
        peer.close()


_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADERS_IN = b"hdrs in."


async def frames(source: trio.SocketStream, preface: bytes = b"") -> AsyncIterator[bytes]:
    """HTTP/2 frames from ``source`` (after ``preface``, yielded first), whole, as bytes."""
    buffer = b""
    async for data in source:
        buffer += data
        if preface:
            if len(buffer) < len(preface):
                continue
            yield buffer[: len(preface)]
            buffer, preface = buffer[len(preface) :], b""
        while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
            size = 9 + int.from_bytes(buffer[:3], "big")
            yield buffer[:size]
            buffer = buffer[size:]


class Withholding:
    """A relay to ``target``: grpcio's first connection loses its DATA frames on the way
    (its requests' headers arrive, their messages never), and ``headers_in`` is set when
    the server has read a request's headers (a PING sent after them comes back; its
    answer is not passed on). Later connections are relayed as they are."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.connections = 0
        self.headers_in = trio.Event()

    async def handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        if self.connections > 1:
            await relay(client, self.target)
            return
        server = await trio.open_tcp_stream("127.0.0.1", self.target)
        async with client, server, trio.open_nursery() as pipes:
            pipes.start_soon(self._pipe, client, server, True, pipes.cancel_scope)
            pipes.start_soon(self._pipe, server, client, False, pipes.cancel_scope)

    async def _pipe(
        self, source: trio.SocketStream, dest: trio.SocketStream, out: bool, done: trio.CancelScope
    ) -> None:
        ping = b"\0\0\x08\x06\0\0\0\0\0" + _HEADERS_IN
        try:
            async for frame in frames(source, _PREFACE if out else b""):
                if out and frame[3:4] == b"\0":  # DATA: withheld
                    continue
                if not out and frame == b"\0\0\x08\x06\x01\0\0\0\0" + _HEADERS_IN:
                    self.headers_in.set()  # (the PING's answer)
                    continue
                await dest.send_all(frame)
                if out and frame[3:4] == b"\x01":  # HEADERS: then the PING
                    await dest.send_all(ping)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()


async def test_grpcio_sends_again_a_call_refused_by_a_hurried_connection(
    settings: Settings, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """At MAX_CONNECTIONS=1, grpcio's check-in is taken in (its headers are read, its
    message withheld on the way) when a dial closes its connection to make room; more dials
    fill the connections closing, and the gate hurries it before it accepts another:
    refused (REFUSED_STREAM) and a last GOAWAY naming stream 0. grpcio sends the call again
    on a new connection, where it is answered. (Time stands still.)

    No dial follows the hurry: one would race grpcio's new connection, and when it came
    first, the gate closed that one too to make room, and grpcio dialed a third time.

    Before a2af52d: the hurried connection closed at once after a GOAWAY naming the
    check-in as taken in, and grpcio ended it UNAVAILABLE."""
    endpoints = await nursery.start(
        serve, settings.replace(max_connections=1, idle_connection_timeout=0)
    )
    withholding = Withholding(endpoints.grpc_port)
    serving = functools.partial(trio.serve_tcp, withholding.handle, 0, host="127.0.0.1")
    listeners = await nursery.start(serving)
    client = GrpcioClient(listeners[0].socket.getsockname()[1])
    answers: list[bool] = []

    async def check_in() -> None:
        answers.append(await client.check_in("127.0.0.1:1"))

    async with trio.open_nursery() as calls:
        calls.start_soon(check_in)
        await withholding.headers_in.wait()
        # The last dial fills the connections closing (grpcio's the first of them).
        dials = [await connected(endpoints.grpc_port) for _ in range(port_share(2).closing)]
    assert answers == [True]
    assert withholding.connections == 2  # sent again, on a new connection
    client.close()
    for peer in dials:
        peer.close()


# -- the connection closed to make room: calls in flight protect only the server's work ----


def message_without_end(port: int) -> tuple[RawPeer, int]:
    """A check-in whose whole message the server took in (a PING's answer says so), and
    not the request's end: its call waits for the peer."""
    peer = RawPeer(port)
    stream_id = peer.open_stream(CHECK_IN, check_in_body("127.0.0.1:1"))
    peer.h2.ping(b"in order")
    peer.send()
    peer.receive_until(lambda events: any(isinstance(e, h2.events.PingAckReceived) for e in events))
    return peer, stream_id


def told_to_go(peer: RawPeer) -> bool:
    """Whether the server sent ``peer`` a GOAWAY before answering a PING sent now (an
    eviction queues its GOAWAY before the connection reads on)."""

    def acks(events: list[h2.events.Event]) -> int:
        return sum(isinstance(e, h2.events.PingAckReceived) for e in events)

    answered = acks(peer.events) + 1
    peer.h2.ping(b"told you")
    peer.send()
    peer.receive_until(lambda events: acks(events) >= answered)
    return bool(goaways(peer))


@pytest.mark.parametrize(
    "hold", [request_without_message, message_without_end, call_waiting_for_window]
)
async def test_a_call_that_waits_on_its_peer_does_not_keep_its_connection_open(
    settings: Settings,
    nursery: trio.Nursery,
    mock_clock: trio.testing.MockClock,
    hold: Callable[[int], tuple[RawPeer, int]],
) -> None:
    """At MAX_CONNECTIONS=2, a peer holds a call that waits on itself (a request without
    its message, a message without the request's end, an answer it gives no window to),
    then an honest selector's check-in is answered; GOODBYE_TIMEOUT later (MockClock: a
    request's arriving bytes protect its connection that long), a third dial closes the
    holder's connection (the least recently active, and the server works on no call of
    either), not the selector's.

    Before: the holder counted as having a call in flight, and the selector's connection
    was closed: a peer kept its connections for one HEADERS frame each, whatever their age."""
    endpoints = await nursery.start(
        serve, settings.replace(max_connections=2, idle_connection_timeout=0)
    )
    port = endpoints.grpc_port
    holder, _ = await trio.to_thread.run_sync(hold, port)
    selector = await connected(port)
    answer = await trio.to_thread.run_sync(selector.call, CHECK_IN, check_in_body("127.0.0.1:2"))
    assert answer["grpc-status"] == "0"
    mock_clock.jump(GOODBYE_TIMEOUT)
    newcomer = await connected(port)
    assert await trio.to_thread.run_sync(told_to_go, newcomer) is False  # admitted
    assert await trio.to_thread.run_sync(told_to_go, holder) is True
    assert await trio.to_thread.run_sync(told_to_go, selector) is False
    for peer in (holder, selector, newcomer):
        peer.close()


async def test_a_request_still_arriving_keeps_its_connection_open(
    settings: Settings, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """At MAX_CONNECTIONS=2, a request is arriving (its headers and part of its
    message in) when an honest selector's check-in is answered: a third dial closes the
    selector's quiet connection, not the one whose request is on its way; GOODBYE_TIMEOUT
    later without more of it (MockClock), a fourth dial closes that one.

    (Without this, grpcio's large requests, cut on their way under a flood of dials, were
    sent again and cut again: 2/100 health checks with 200 KB ended DEADLINE_EXCEEDED.)"""
    endpoints = await nursery.start(
        serve, settings.replace(max_connections=2, idle_connection_timeout=0)
    )
    port = endpoints.grpc_port

    def part_of_a_request() -> RawPeer:
        peer = RawPeer(port)
        stream_id = peer.open_stream(CHECK_IN)
        # 10 KB announced (within a check-in's own limit, 16 KiB), 1 KB of it sent
        peer.h2.send_data(stream_id, struct.pack(">BI", 0, 10_000) + b"\x0a" * 1000)
        peer.h2.ping(b"in order")
        peer.send()
        peer.receive_until(
            lambda events: any(isinstance(e, h2.events.PingAckReceived) for e in events)
        )
        return peer

    sender = await trio.to_thread.run_sync(part_of_a_request)
    selector = await connected(port)
    answer = await trio.to_thread.run_sync(selector.call, CHECK_IN, check_in_body("127.0.0.1:2"))
    assert answer["grpc-status"] == "0"
    third = await connected(port)
    assert await trio.to_thread.run_sync(told_to_go, third) is False  # admitted
    assert await trio.to_thread.run_sync(told_to_go, selector) is True
    assert await trio.to_thread.run_sync(told_to_go, sender) is False
    mock_clock.jump(GOODBYE_TIMEOUT)
    fourth = await connected(port)
    assert await trio.to_thread.run_sync(told_to_go, fourth) is False  # admitted
    assert await trio.to_thread.run_sync(told_to_go, sender) is True
    assert await trio.to_thread.run_sync(told_to_go, third) is False
    for peer in (sender, selector, third, fourth):
        peer.close()
