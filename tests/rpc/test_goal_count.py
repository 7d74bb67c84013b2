"""GoalCountReached over kept connections: reused, bounded in number, redialed when closed.

The selectors are real gRPC servers (:class:`FakeSelector`) reached through a
TCP relay that counts the connections it carries, so what is asserted is what
a selector sees on the wire.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import random
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import pytest
import trio
import trio.testing
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from helpers.h2peer import framed, padded
from helpers.peers import FakeSelector
from helpers.pki import Pki
from helpers.relay import relay
from purerpc.grpclib.exceptions import RpcFailedError
from purerpc.grpclib.status import StatusCode

from fl_coordinator._proto import fl_intra_pb2
from fl_coordinator.rpc.goal_count import DEFAULT_MAX_OPEN, GoalCountClient, outgoing_budget


class Wire:
    """Connections carried by every :class:`Relay` that shares it: accepted, open, and
    ``peak``, the most connections the client held open to the relays at once (with
    ``at_peak``, those connections: the client's port and the relay's).

    ``peak`` is sampled from the kernel's table each time a relay accepts (the
    only moment it can grow): a relay sees a closed connection a little after
    the client closed it, so its own count would overstate what the client holds.
    Each connection counts once, by its ports at both ends (the client's and the
    relay's), and only if a relay accepted it. The kernel writes its table over
    several reads, not at one instant, and a line may come twice when the table
    changes meanwhile (61 of 259 reads listed an ESTABLISHED socket twice while
    two other processes opened and closed connections): counting lines gave 5
    of 4 where the same table, read again at once, listed 4 connections.
    """

    def __init__(self) -> None:
        self.accepted = self.open = self.peak = 0
        self.at_peak: list[tuple[int, int]] = []
        self._pairs: set[tuple[int, int]] = set()  # (client's port, relay's) of each accepted
        self._changed = trio.lowlevel.ParkingLot()

    def opened(self, client_port: int, relay_port: int) -> None:
        self._pairs.add((client_port, relay_port))
        self.accepted += 1
        self.open += 1
        now = self._client_side()
        if len(now) > self.peak:
            self.peak, self.at_peak = len(now), now
        self._changed.unpark_all()

    def _client_side(self) -> list[tuple[int, int]]:
        """The client's ends of accepted connections that are ESTABLISHED (IPv4)."""
        with open("/proc/net/tcp") as table:
            rows = [line.split() for line in list(table)[1:]]
        return sorted({
            ends
            for _, local, remote, state, *_ in rows
            if state == "01" and (ends := (_port(local), _port(remote))) in self._pairs
        })  # fmt: skip

    def closed(self) -> None:
        self.open -= 1
        self._changed.unpark_all()

    async def until(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(30):
            while not condition():
                await self._changed.park()


def _port(address: str) -> int:
    """The port of an address in /proc/net/tcp's form (``0100007F:9C40``)."""
    return int(address.split(":")[1], 16)


class Relay:
    """Listens on 127.0.0.1 and forwards each connection to ``target`` (a port), counted."""

    def __init__(self, target: int, wire: Wire) -> None:
        self._target, self._wire = target, wire
        self._scopes: set[trio.CancelScope] = set()
        self._clients: set[_TakingTurns] = set()
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> str:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self._relay, listeners)
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Close every connection (as a selector that restarts or drops idle ones)."""
        for scope in self._scopes:
            scope.cancel()

    async def garble(self) -> None:
        """Send each client a frame its HTTP/2 rejects (a SETTINGS frame of 5 bytes), so
        that it ends the connection itself: as a grpcio or grpc-go selector's GOAWAY and
        PING make purerpc end it when the selector shuts down."""
        await self._to_clients(b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + bytes(5))

    async def goaway(self) -> None:
        """Send each client an HTTP/2 GOAWAY (NO_ERROR, last stream 1) and keep the
        connection open: as a selector draining its connections before it closes them."""
        await self._to_clients(b"\x00\x00\x08\x07\x00\x00\x00\x00\x00" + (1).to_bytes(4) + bytes(4))

    async def reset(self, code: int) -> None:
        """Send each client an HTTP/2 RST_STREAM of stream 1 (a connection's first call)
        with error ``code``: as a selector that refuses or cancels that call."""
        await self._to_clients(b"\x00\x00\x04\x03\x00\x00\x00\x00\x01" + code.to_bytes(4))

    async def _to_clients(self, frame: bytes) -> None:
        for client in list(self._clients):
            await client.send_all(frame)

    async def _relay(self, socket_stream: trio.SocketStream) -> None:
        try:
            client_port = socket_stream.socket.getpeername()[1]
        except OSError:  # reset before this handler ran: not open, so never counted
            client_port = 0
        self._wire.opened(client_port, self.port)
        client = _TakingTurns(socket_stream)
        try:
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                self._clients.add(client)
                await relay(client, self._target)
        finally:
            self._scopes.discard(scope)
            self._clients.discard(client)
            self._wire.closed()


class _TakingTurns(trio.abc.Stream):
    """A stream whose sends take turns, whole: the relay's forwarding and the frames a test
    sends (trio refuses two sends at once on one stream)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._turn = trio.Lock()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._turn:
            await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _selectors(
    nursery: trio.Nursery, count: int, wire: Wire
) -> list[tuple[str, FakeSelector, Relay]]:
    made = []
    for _ in range(count):
        selector = await FakeSelector().start(nursery)
        relay = Relay(selector.port, wire)
        made.append((await relay.start(nursery), selector, relay))
    return made


async def _told(selector: FakeSelector) -> int:
    """How many GoalCountReached calls ``selector`` answered so far (drained)."""
    count = 0
    while True:
        try:
            selector.told.receive_nowait()
        except trio.WouldBlock:
            return count
        count += 1


async def test_one_connection_per_selector_across_calls() -> None:
    wire = Wire()
    client = GoalCountClient(call_timeout=30)
    async with trio.open_nursery() as nursery:
        [(address, selector, _)] = await _selectors(nursery, 1, wire)
        await nursery.start(client.run)
        for _ in range(3):
            await client(address)
        assert await _told(selector) == 3
        assert (wire.accepted, wire.open, client.open) == (1, 1, 1)
        nursery.cancel_scope.cancel()


async def test_without_run_each_call_dials() -> None:
    wire = Wire()
    client = GoalCountClient(call_timeout=30)
    async with trio.open_nursery() as nursery:
        [(address, selector, _)] = await _selectors(nursery, 1, wire)
        for _ in range(3):
            await client(address)
        await wire.until(lambda: wire.open == 0)
        assert (await _told(selector), wire.accepted) == (3, 3)
        nursery.cancel_scope.cancel()


async def test_open_connections_bounded_by_the_pool_limit() -> None:
    """A broadcast to 24 selectors through 4 slots: all told once, never 5 connections."""
    wire = Wire()
    client = GoalCountClient(call_timeout=30, max_open=4)
    async with trio.open_nursery() as nursery:
        selectors = await _selectors(nursery, 24, wire)
        await nursery.start(client.run)
        async with trio.open_nursery() as broadcast:
            for address, _, _ in selectors:
                broadcast.start_soon(client, address)
        assert [await _told(selector) for _, selector, _ in selectors] == [1] * 24
        assert wire.accepted == 24
        assert wire.peak == 4, wire.at_peak
        assert client.open == 4
        nursery.cancel_scope.cancel()


async def test_new_selectors_told_at_once_close_idle_connections_to_make_room() -> None:
    """Two connections kept idle, then four new selectors told at once through 4 slots:
    the two dials beyond the free slots each close an idle connection (before, all four
    saw a free slot, none closed one, and two waited out call_timeout)."""
    wire = Wire()
    client = GoalCountClient(call_timeout=30, max_open=4)
    async with trio.open_nursery() as nursery:
        selectors = await _selectors(nursery, 6, wire)
        await nursery.start(client.run)
        for address, _, _ in selectors[:2]:
            await client(address)
        async with trio.open_nursery() as broadcast:
            for address, _, _ in selectors[2:]:
                broadcast.start_soon(client, address)
        assert [await _told(selector) for _, selector, _ in selectors] == [1] * 6
        assert (wire.accepted, wire.peak, client.open) == (6, 4, 4), wire.at_peak
        nursery.cancel_scope.cancel()


async def test_a_connection_the_client_ended_frees_its_place_in_the_pool() -> None:
    """Two kept connections through 2 slots, the second then ended by the client (its
    peer's HTTP/2 refused): a third selector takes its place, and the live first one is
    kept (while the ended one still counted, the first was closed to make room)."""
    wire = Wire()
    client = GoalCountClient(call_timeout=30, max_open=2)
    async with trio.open_nursery() as nursery:
        (first, _, _), (second, _, ends), (third, _, _) = await _selectors(nursery, 3, wire)
        await nursery.start(client.run)
        await client(first)
        await client(second)
        await ends.garble()
        await wire.until(lambda: wire.open == 1)
        await client(third)
        await client(first)  # on the connection kept since its first call
        assert (wire.accepted, wire.open, client.open) == (3, 2, 2)
        nursery.cancel_scope.cancel()


async def test_a_dial_closed_by_retain_fails_its_call_with_a_connection_error(pki: Pki) -> None:
    """retain() while a selector is being dialed (a TLS handshake its peer never answers):
    the call fails as a closed connection (before: trio's RuntimeError, "child exited
    without calling task_status.started()")."""
    dialed = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:
        dialed.set()
        await trio.sleep_forever()

    client = GoalCountClient(call_timeout=30, ssl_context=pki.client_context())
    failures: list[BaseException] = []

    async def call(address: str) -> None:
        try:
            await client(address)
        except Exception as error:
            failures.append(error)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, silent, listeners)
        address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        await nursery.start(client.run)
        async with trio.open_nursery() as calls:
            calls.start_soon(call, address)
            await dialed.wait()
            client.retain([])
        assert [(type(e), str(e)) for e in failures] == [
            (ConnectionError, f"connection to {address} closed while dialing")
        ]
        assert client.open == 0
        nursery.cancel_scope.cancel()


async def test_a_connection_the_selector_closed_is_dialed_again() -> None:
    """A kept connection the peer ended is seen before the call: no wait for the timeout.
    Its task ends after the one dialed in its place started, and must not take the new one
    out of the pool (which would then hold a slot that retain() could not give back)."""
    wire = Wire()
    client = GoalCountClient(call_timeout=600)
    async with trio.open_nursery() as nursery:
        [(address, selector, relay)] = await _selectors(nursery, 1, wire)
        await nursery.start(client.run)
        await client(address)
        relay.cut()
        await wire.until(lambda: wire.open == 0)
        with trio.fail_after(60):  # far below call_timeout: a hang would show
            await client(address)  # dialed again; the closed connection's task ends
            await client(address)  # on the connection dialed again
        assert (await _told(selector), wire.accepted, wire.open, client.open) == (3, 2, 1, 1)
        client.retain([])
        await wire.until(lambda: wire.open == 0)
        assert client.open == 0
        nursery.cancel_scope.cancel()


class StalledSelector(FakeSelector):
    """Takes GoalCountReached (``arrived`` is set) and never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = trio.Event()

    async def GoalCountReached(self, message: fl_intra_pb2.Empty) -> fl_intra_pb2.Empty:
        self.arrived.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def _call_in_flight(
    nursery: trio.Nursery, act: Callable[[Relay], Awaitable[object]]
) -> tuple[str, Exception, Wire, GoalCountClient]:
    """Tell a :class:`StalledSelector` through a relay; while the call waits for its
    answer, ``act`` on the relay. The selector's address, what the call raised (within 60 s,
    far below its call_timeout: a hang shows), the wire and the client."""
    wire = Wire()
    client = GoalCountClient(call_timeout=600)
    selector = await StalledSelector().start(nursery)
    relay = Relay(selector.port, wire)
    address = await relay.start(nursery)
    await nursery.start(client.run)
    failures: list[Exception] = []

    async def call() -> None:
        try:
            await client(address)
        except Exception as error:
            failures.append(error)

    with trio.fail_after(60):
        async with trio.open_nursery() as calls:
            calls.start_soon(call)
            await selector.arrived.wait()
            # What the selector sent so far has reached the client: a frame injected before
            # it (HEADERS of its answer) would fail the old code at once too, by accident.
            await trio.testing.wait_all_tasks_blocked()
            await act(relay)
    [failure] = failures
    return address, failure, wire, client


async def _cut(relay: Relay) -> None:
    relay.cut()


async def test_a_call_in_flight_fails_at_once_when_the_selector_closes_its_connection() -> None:
    """The selector closes the kept connection while a call waits for its answer: the call
    fails as a closed connection (to be retried) instead of waiting out call_timeout (before:
    purerpc's reader stopped at the end of the stream without a word)."""
    async with trio.open_nursery() as nursery:
        address, failure, _, client = await _call_in_flight(nursery, _cut)
        assert (type(failure), str(failure)) == (
            ConnectionError, f"connection to {address} closed during the call"
        )  # fmt: skip
        assert client.open == 0
        nursery.cancel_scope.cancel()


async def test_a_call_in_flight_fails_at_once_when_the_selector_sends_goaway() -> None:
    """A GOAWAY while a call waits for its answer: h2 then refuses every frame, the answer
    included, so the call fails at once and the connection is closed, freeing its slot
    (before: the call waited out call_timeout, and the connection stayed in the pool)."""
    async with trio.open_nursery() as nursery:
        address, failure, wire, client = await _call_in_flight(nursery, Relay.goaway)
        await wire.until(lambda: wire.open == 0)
        assert (type(failure), str(failure)) == (
            ConnectionError, f"connection to {address} closed during the call"
        )  # fmt: skip
        assert client.open == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("code", "status"),
    [(0x7, StatusCode.UNAVAILABLE), (0x8, StatusCode.CANCELLED), (0x2, StatusCode.INTERNAL),
     (0x99, StatusCode.INTERNAL)],
)  # fmt: skip
async def test_a_call_whose_stream_the_selector_resets_fails_at_once_with_its_status(
    code: int, status: StatusCode
) -> None:
    """RST_STREAM of a call in flight (REFUSED_STREAM, CANCEL, INTERNAL_ERROR, a code
    HTTP/2 does not define): the call fails at once with gRPC's status for that code, and
    the connection, which the reset does not end, is kept (before: purerpc ignored the
    reset and the call waited out call_timeout)."""
    async with trio.open_nursery() as nursery:
        _, failure, wire, client = await _call_in_flight(
            nursery, functools.partial(Relay.reset, code=code)
        )
        assert isinstance(failure, RpcFailedError), failure
        name = ErrorCodes(code).name if code in {0x2, 0x7, 0x8} else str(code)
        assert (failure.status.status_code, failure.status.status_message) == (
            status, f"the peer reset the call's stream (HTTP/2 {name})"
        )  # fmt: skip
        assert (wire.accepted, wire.open, client.open) == (1, 1, 1)
        nursery.cancel_scope.cancel()


async def test_a_selector_that_ends_the_tls_handshake_fails_the_call_with_a_connection_error(
    pki: Pki,
) -> None:
    """A selector that closes the connection during the TLS handshake: a ConnectionError
    that says so (before: anyio's EndOfStream or BrokenResourceError, without a word)."""

    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()

    client = GoalCountClient(call_timeout=30, ssl_context=pki.client_context())
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, hang_up, listeners)
        address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        await nursery.start(client.run)
        with pytest.raises(ConnectionError) as failed:
            await client(address)
        assert str(failed.value) == f"{address} ended the connection during the TLS handshake"
        assert client.open == 0
        nursery.cancel_scope.cancel()


class Stalling(FakeSelector):
    """Takes every GoalCountReached and answers none while ``stalls``; counts the calls it
    took (``taken``) and those whose task was cancelled meanwhile (``cancelled``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stalls = True
        self.taken = self.cancelled = 0
        self._changed = trio.lowlevel.ParkingLot()

    async def GoalCountReached(self, message: fl_intra_pb2.Empty) -> fl_intra_pb2.Empty:
        self.taken += 1
        self._changed.unpark_all()
        try:
            while self.stalls:
                await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled += 1
            self._changed.unpark_all()
            raise
        return fl_intra_pb2.Empty()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.park()


async def test_a_call_cut_short_is_cancelled_at_the_selector_and_its_connection_kept() -> None:
    """120 calls, each cancelled while the selector works on it (as its time limit would),
    then one it answers, all on one kept connection: each cancelled call resets its stream
    (RST_STREAM CANCEL), so the selector stops working on it and its stream closes.

    Before: the selector's tasks ran on and every stream stayed open, and from the 101st
    call (the selector's MAX_CONCURRENT_STREAMS) each call failed at once with h2's
    TooManyStreamsError, until the connection ended."""
    wire = Wire()
    async with trio.open_nursery() as nursery:
        selector = await Stalling().start(nursery)
        relay = Relay(selector.port, wire)
        address = await relay.start(nursery)
        client = GoalCountClient(call_timeout=600)
        await nursery.start(client.run)
        with trio.fail_after(60):
            for count in range(1, 121):
                async with trio.open_nursery() as call:
                    call.start_soon(client, address)
                    await selector.until(lambda count=count: selector.taken == count)
                    call.cancel_scope.cancel()
            await selector.until(lambda: selector.cancelled == 120)
            selector.stalls = False
            await client(address)
        assert (selector.taken, selector.cancelled, wire.accepted) == (121, 120, 1)
        nursery.cancel_scope.cancel()


class Dawdling(FakeSelector):
    """Answers each GoalCountReached after a random delay (0 to 50 ms)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self._rng = rng

    async def GoalCountReached(self, message: fl_intra_pb2.Empty) -> fl_intra_pb2.Empty:
        await trio.sleep(self._rng.uniform(0, 0.05))
        return fl_intra_pb2.Empty()


async def test_calls_cut_short_among_others_in_flight_leave_the_connection_alone() -> None:
    """150 calls, 50 at a time on one kept connection, each with a random time limit (0 to
    50 ms) and answered after a random delay: those cut short end alone, the others are
    answered, and the connection stays, holding nothing of them. (The first reset also
    dropped purerpc's record of its stream, which its reader may still look up for the
    events of a read it hands out: a KeyError ended the connection and every call on it, 29
    to 37 of 50 here. The second kept the records, and what the answers that came after
    brought, until the connection ended: about 4.6 KB a call.)"""
    rng = random.Random(1)
    failures: list[str] = []
    wire = Wire()
    async with trio.open_nursery() as nursery:
        selector = await Dawdling(rng).start(nursery)
        address = await Relay(selector.port, wire).start(nursery)
        client = GoalCountClient(call_timeout=600)
        await nursery.start(client.run)

        async def one() -> None:
            with trio.move_on_after(rng.uniform(0, 0.05)):
                try:
                    await client(address)
                except Exception as error:
                    failures.append(f"{type(error).__name__}: {error}")

        with trio.fail_after(60):
            await client(address)  # dialed (a dial cut short would fail those waiting for it)
            for _ in range(3):
                async with trio.open_nursery() as calls:
                    for _ in range(50):
                        calls.start_soon(one)
            await client(address)  # answered on the same connection
        socket = client._links[address].channel._grpc_socket  # type: ignore[union-attr]
        left = len(socket._streams), len(socket._grpc_connection.message_read_buffers)
        assert (failures, wire.accepted, left) == ([], 1, (0, 0))
        nursery.cancel_scope.cancel()


class Wordy(FakeSelector):
    """Answers GoalCountReached with 200 KB more than Empty: a field Empty does not know."""

    async def GoalCountReached(self, message: fl_intra_pb2.Empty) -> fl_intra_pb2.Empty:
        return fl_intra_pb2.Empty.FromString(padded(fl_intra_pb2.Empty(), 200_000))


async def test_an_answer_larger_than_http2s_default_window_comes_whole() -> None:
    """A 200 KB answer (within MAX_ANSWER_BYTES), twice on one kept connection. Before: the
    connection's window stayed at HTTP/2's 65,535 bytes, purerpc gives bytes back only for
    whole messages, and the answer never came whole (the selector stopped at 65,535 bytes;
    the call timed out)."""
    async with trio.open_nursery() as nursery:
        selector = await Wordy().start(nursery)
        client = GoalCountClient(call_timeout=30)
        await nursery.start(client.run)
        with trio.fail_after(60):
            await client(selector.id)
            await client(selector.id)
        assert client.open == 1
        nursery.cancel_scope.cancel()


class Pushing:
    """A selector on raw HTTP/2 (``h2``, server side) that answers each GoalCountReached and
    pushes a stream with it (PUSH_PROMISE, then a 60 KB message on the pushed stream), though
    the client said it takes no pushes: ``connections`` counts the connections it served."""

    def __init__(self) -> None:
        self.connections = 0

    async def start(self, nursery: trio.Nursery) -> str:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(trio.serve_listeners, self._serve, listeners)
        return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2c.initiate_connection()
        await stream.send_all(h2c.data_to_send())
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await stream.receive_some(65536):
                for event in h2c.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded):  # a request, whole
                        self._answer_and_push(h2c, event.stream_id)
                await stream.send_all(h2c.data_to_send())

    @staticmethod
    def _answer_and_push(h2c: h2.connection.H2Connection, stream_id: int) -> None:
        h2c.remote_settings._settings[SettingCodes.ENABLE_PUSH] = collections.deque([1])
        pushed = h2c.get_next_available_stream_id()
        request = [(":method", "GET"), (":path", "/x"), (":scheme", "http"), (":authority", "a")]
        h2c.push_stream(stream_id, pushed, request)
        h2c.send_headers(pushed, [(":status", "200"), ("content-type", "application/grpc")])
        pushing = framed(bytes(60_000))[: h2c.local_flow_control_window(pushed)]
        if pushing:
            h2c.send_data(pushed, pushing)
        h2c.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        if h2c.local_flow_control_window(stream_id) >= 5:  # (else the client's window is full)
            h2c.send_data(stream_id, framed(b""))
            h2c.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)


async def test_a_selector_that_pushes_streams_ends_its_connection() -> None:
    """gRPC never pushes, and the client says so (SETTINGS_ENABLE_PUSH 0): a selector that
    pushes anyway breaks the connection, each call on it fails at once as a closed connection
    (to be retried), and the next dials again. Before: the pushed messages, which no call
    reads, filled the connection's window, and from then on every call waited out its limit."""
    selector = Pushing()
    async with trio.open_nursery() as nursery:
        address = await selector.start(nursery)
        client = GoalCountClient(call_timeout=5)
        await nursery.start(client.run)
        answered = 0
        with trio.fail_after(60):
            for _ in range(40):
                with contextlib.suppress(ConnectionError):
                    await client(address)
                    answered += 1
        assert (answered, selector.connections) == (0, 40)
        nursery.cancel_scope.cancel()


async def test_a_connection_the_selector_sent_goaway_on_is_dialed_again() -> None:
    """After a GOAWAY (the connection still open) h2 refuses new calls on it: the next call
    dials a new connection (before: it failed with h2's ProtocolError, and so did its
    retries for as long as the selector kept the old connection open)."""
    wire = Wire()
    client = GoalCountClient(call_timeout=30)
    async with trio.open_nursery() as nursery:
        [(address, selector, relay)] = await _selectors(nursery, 1, wire)
        await nursery.start(client.run)
        await client(address)
        await relay.goaway()
        await trio.testing.wait_all_tasks_blocked()  # the client read the GOAWAY
        await client(address)
        await wire.until(lambda: wire.open == 1)
        assert (await _told(selector), wire.accepted, client.open) == (2, 2, 1)
        nursery.cancel_scope.cancel()


async def test_retain_closes_the_channels_of_selectors_not_in_the_round() -> None:
    wire = Wire()
    client = GoalCountClient(call_timeout=30)
    async with trio.open_nursery() as nursery:
        selectors = await _selectors(nursery, 3, wire)
        await nursery.start(client.run)
        for address, _, _ in selectors:
            await client(address)
        client.retain([selectors[0][0]])
        await wire.until(lambda: wire.open == 1)
        assert client.open == 1
        await client(selectors[0][0])
        assert wire.accepted == 3
        nursery.cancel_scope.cancel()


async def test_unreachable_selector_fails_and_frees_its_slot() -> None:
    client = GoalCountClient(call_timeout=30, max_open=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        await listener.aclose()  # nothing listens there now
        with pytest.raises(OSError):
            await client(f"127.0.0.1:{port}")
        assert client.open == 0
        wire = Wire()
        [(address, selector, _)] = await _selectors(nursery, 1, wire)
        await client(address)
        assert (await _told(selector), client.open) == (1, 1)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("limit", "expected"), [(64, 16), (256, 32), (1024, 128), (20000, DEFAULT_MAX_OPEN)]
)
def test_outgoing_budget_is_half_the_reserve(limit: int, expected: int) -> None:
    assert outgoing_budget(limit) == expected
