"""The admission gate on its own, with real sockets on 127.0.0.1.

The whole coordinator under a descriptor limit is tested in
test_untrusted_connections.py; here, the gate's bound on connections closed
to make room that take their time to go.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from fl_coordinator.connections import (
    CLOSING_MAX,
    ConnectionLimits,
    Gate,
    Slot,
    descriptor_budget,
    port_share,
)

CAP = 4
DIALS = 40


class Held:
    """The connections a gate's listeners hold: accepted and not closed yet (now, and at most)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def accepting(
        self, listener: trio.SocketListener
    ) -> Callable[[], Awaitable[trio.SocketStream]]:
        async def accept() -> trio.SocketStream:
            stream = await listener.accept()
            self.live += 1
            self.peak = max(self.peak, self.live)
            return stream

        return accept

    async def close(self, stream: trio.SocketStream) -> None:
        self.live -= 1
        await trio.aclose_forcefully(stream)


def stubborn(evicted: list[int]) -> Callable[[trio.SocketStream, Slot], Awaitable[None]]:
    """A handler that reads its client's number, answers ``!`` and never goes by itself:
    told to go (its number is put in ``evicted``), it does not, as a peer that never
    takes its GOAWAY makes its goodbye last GOODBYE_TIMEOUT."""

    async def handle(stream: trio.SocketStream, slot: Slot) -> None:
        number = int((await stream.receive_some(8)).decode())
        slot.evict = lambda: evicted.append(number)
        await stream.send_all(b"!")
        await trio.sleep_forever()

    return handle


async def dial(port: int, number: int) -> trio.SocketStream:
    """A client served by a :func:`stubborn` handler."""
    client = await trio.open_tcp_stream("127.0.0.1", port)
    await client.send_all(str(number).encode())
    assert await client.receive_some(1) == b"!"  # served
    return client


async def test_connections_closed_to_make_room_that_never_go_hold_at_most_closing_max(
    nursery: trio.Nursery,
) -> None:
    """Every connection ignores its eviction: 40 dials at a cap of 4 hold at most
    4 + CLOSING_MAX descriptors, and the oldest evicted ones are closed at once.

    Before: an evicted connection left the count at once, so all 40 were held.
    """
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    held = Held()
    evicted: list[int] = []
    gate: Gate[trio.SocketStream] = Gate(
        "test port", ConnectionLimits(max_connections=CAP), make_room=True
    )
    nursery.start_soon(gate.serve, [held.accepting(listener)], held.close, stubborn(evicted))

    clients = []
    with trio.fail_after(60):
        for number in range(DIALS):
            clients.append(await dial(port, number))
        assert evicted == list(range(DIALS - CAP))  # least recently active first
        assert held.peak == CAP + CLOSING_MAX, held.peak
        # with every place taken and CLOSING_MAX closing, the gate hurries the oldest
        # before its next accept: one fewer is left closing while no one dials
        assert held.live == CAP + CLOSING_MAX - 1
        gone = DIALS - CAP - CLOSING_MAX + 1
        for client in clients[:gone]:  # hurried: closed without waiting for their goodbye
            assert await client.receive_some(1) == b""
    for client in clients:
        await client.aclose()
    nursery.cancel_scope.cancel()


async def test_several_listeners_of_one_gate_share_its_closing_allowance(
    nursery: trio.Nursery,
) -> None:
    """Three sockets for one port (a HOST with three addresses; ``localhost`` on IPv4
    and IPv6 gives two), dialed at once, 30 times, every connection ignoring its
    eviction: at most 4 + CLOSING_MAX held, and every socket keeps serving.

    Before: each accept loop looked at the allowance before its ``accept`` and
    admitted after, so every loop waiting in ``accept`` could add one closing
    connection beyond it: 4 + 7 + 3 = 14 held.
    """
    listeners = [(await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] for _ in range(3)]
    ports = [listener.socket.getsockname()[1] for listener in listeners]
    held = Held()
    evicted: list[int] = []
    gate: Gate[trio.SocketStream] = Gate(
        "test port", ConnectionLimits(max_connections=CAP), make_room=True
    )
    accepts = [held.accepting(listener) for listener in listeners]
    nursery.start_soon(gate.serve, accepts, held.close, stubborn(evicted))

    clients: list[trio.SocketStream] = []

    async def dial_into(port: int, number: int) -> None:
        clients.append(await dial(port, number))

    with trio.fail_after(60):
        for burst in range(30):
            async with trio.open_nursery() as dials:
                for index, port in enumerate(ports):
                    dials.start_soon(dial_into, port, 3 * burst + index)
    assert len(clients) == 90
    assert len(evicted) == 90 - CAP
    assert held.peak <= CAP + CLOSING_MAX, held.peak
    for client in clients:
        await client.aclose()
    nursery.cancel_scope.cancel()


def test_a_ports_share_leaves_room_for_its_closing_connections() -> None:
    """192 descriptors of 256 for the connections, two ports: 96 each, of which
    CLOSING_MAX closing ones and the spare descriptor."""
    assert port_share(2, 256) == (96 - CLOSING_MAX - 1, CLOSING_MAX)
    assert port_share(3, 256) == (64 - CLOSING_MAX - 1, CLOSING_MAX)
    assert port_share(2, 40) == (2, 1)  # 4 each


def test_under_a_small_limit_closing_connections_leave_most_of_the_share_open() -> None:
    """64 descriptors, three ports: 10 each. Before: 9 of them kept for closing ones
    and the one being accepted, 1 for open connections (two selectors closed each
    other's connections; and 48, two ports: 8 each, 10 held); now 1 closing, 8
    open. Whatever the limit, a port's connections fit its part, and at least
    half of it is for open ones."""
    assert port_share(3, 64) == (8, 1)
    assert port_share(2, 64) == (13, 2)
    for ports in (2, 3):
        for limit in range(40, 4096):
            part = descriptor_budget(limit) // ports
            share = port_share(ports, limit)
            assert 1 <= share.closing <= CLOSING_MAX
            if part >= 3:  # (below, 1 open and 1 closing are more than the part)
                assert share.connections + share.closing + 1 <= part, (ports, limit, share)
            assert share.connections >= part // 2, (ports, limit, share)


async def test_a_full_port_closes_a_connection_without_calls_in_flight_first(
    nursery: trio.Nursery,
) -> None:
    """Clients 0 and 1 have calls in flight (Slot.set_busy), 2 and 3 not, the newcomers
    do: dials 4 and 5 close 2 and 3 (the least recently active without calls), then 6
    and 7 close 0 and 1 (every open one is busy). Two may be closing: before each accept
    with two closing, the gate hurries one: 2 (of 2, 3), then 3 (of 3 and the older but
    busy 0), then 0 (of 0, 1: both busy).

    Before: 0, 1, 2, 3 closed in that order, and hurried in that order."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    held = Held()
    evicted: list[int] = []
    hurried: list[int] = []

    async def handle(stream: trio.SocketStream, slot: Slot) -> None:
        number = int((await stream.receive_some(8)).decode())
        slot.evict = lambda: evicted.append(number)
        slot.set_busy(number in (0, 1) or number >= CAP)
        await stream.send_all(b"!")
        try:
            await trio.sleep_forever()
        finally:
            hurried.append(number)

    limits = ConnectionLimits(max_connections=CAP, max_closing=2)
    gate: Gate[trio.SocketStream] = Gate("test port", limits, make_room=True)
    nursery.start_soon(gate.serve, [held.accepting(listener)], held.close, handle)
    with trio.fail_after(60):
        clients = [await dial(port, number) for number in range(CAP + 4)]
        assert evicted == [2, 3, 0, 1]
        assert hurried == [2, 3, 0]
    for client in clients:
        await client.aclose()
    nursery.cancel_scope.cancel()


async def test_a_connection_that_goes_quiet_keeps_its_place_in_the_recency_order(
    nursery: trio.Nursery,
) -> None:
    """Clients 0..3 are quiet, 0 the least recently active; 0 then has a call in flight
    and goes quiet again without any activity (a request opened and reset, as a peer may
    do for nothing): dial 4 still closes 0, the least recently active.

    Before: going quiet made 0 the last to close; dial 4 closed 1."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    held = Held()
    evicted: list[int] = []
    slots: dict[int, Slot] = {}

    async def handle(stream: trio.SocketStream, slot: Slot) -> None:
        number = int((await stream.receive_some(8)).decode())
        slot.evict = lambda: evicted.append(number)
        slots[number] = slot
        if number == CAP - 1:  # all are in: 0 has a call, then none
            slots[0].set_busy(True)
            slots[0].set_busy(False)
        await stream.send_all(b"!")
        await trio.sleep_forever()

    gate: Gate[trio.SocketStream] = Gate("test port", ConnectionLimits(CAP), make_room=True)
    nursery.start_soon(gate.serve, [held.accepting(listener)], held.close, handle)
    with trio.fail_after(60):
        clients = [await dial(port, number) for number in range(CAP + 1)]
        assert evicted == [0]
    for client in clients:
        await client.aclose()
    nursery.cancel_scope.cancel()
