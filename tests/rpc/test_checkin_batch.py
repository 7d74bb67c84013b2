"""The batched check-in: the new service on the coordinator, the batcher in the selector,
and the selector's fallback to one call per client against a coordinator without it."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
import trio
import trio.testing
from helpers.metrics import scrape
from helpers.peers import FakeSelector, refused_wait_ms, serve_and_watch

from fl_coordinator._proto import (
    fl_intra_batch_pb2,
    fl_intra_grpc,
    fl_intra_pb2,
)
from fl_coordinator.config import Settings
from fl_coordinator.federation.checkin_batch import Batcher
from fl_coordinator.federation.selector import Selector, SelectorOptions
from fl_coordinator.rpc.listener import serve_grpc
from fl_coordinator.storage.layout import Layout

BATCH_PATH = "/flcoordinator.v1.FlIntraBatch/CheckInClients"


class BatchClient:
    """grpcio (the independent implementation), method path spelled out by hand."""

    def __init__(self, port: int) -> None:
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._call = self._channel.unary_unary(
            BATCH_PATH,
            request_serializer=fl_intra_batch_pb2.ClientBatch.SerializeToString,
            response_deserializer=fl_intra_batch_pb2.ClientsAccepted.FromString,
        )

    async def ask(self, selector_id: str, clients: int) -> int:
        request = fl_intra_batch_pb2.ClientBatch(id=selector_id, clients=clients)
        answer = await trio.to_thread.run_sync(lambda: self._call(request, timeout=30))
        return answer.accepted

    def close(self) -> None:
        self._channel.close()


async def test_batches_are_served_first_come_first_served_up_to_the_goal(
    settings: Settings, nursery: trio.Nursery
) -> None:
    endpoints, watcher, old_style = await serve_and_watch(
        nursery, settings.replace(checkin_limit=5, metrics_port=0)
    )
    a, b = await FakeSelector().start(nursery), await FakeSelector().start(nursery)
    client = BatchClient(endpoints.grpc_port)
    try:
        assert await client.ask(a.id, 0) == 0  # nothing asked: nothing changes
        assert await client.ask("../../etc:1", 3) == 0  # hostile id: refused, noted
        assert await client.ask(a.id, 3) == 3
        assert await client.ask(b.id, 4) == 2  # what the goal had left
        configured = await watcher.wait_for(lambda m: m["stage"] == "CONFIGURATION")
        assert await client.ask(b.id, 1) == 0  # round is full
        assert not await old_style.check_in(a.id)  # the old RPC agrees
    finally:
        client.close()
    assert (configured["accepted"], configured["selectors"]) == (5, [a.id, b.id])
    # Snapshots within 0.1 s of one another in one stage are merged into the latest, so
    # the refusal's own snapshot (accepted 0) may or may not be seen; no other count is.
    selection = [m["accepted"] for m in watcher.messages if m["stage"] == "SELECTION"]
    assert (selection[0], selection[-1], set(selection)) == (0, 3, {0, 3})
    assert [who for who, _ in configured["ignored"]] == ["../../etc:1"]
    with trio.fail_after(10):  # both selectors holding clients are told
        await a.told.receive()
        await b.told.receive()
    # Metrics count clients, not calls: 5 kept; 3 (bad id) + 2 + 1 + 1 turned away.
    assert endpoints.metrics_url is not None
    samples = await scrape(endpoints.metrics_url)
    assert samples['fl_coordinator_checkins_total{result="accepted"}'] == 5
    assert samples['fl_coordinator_checkins_total{result="refused"}'] == 7


async def test_batcher_asks_once_for_the_clients_that_arrived_during_a_call() -> None:
    asked: list[int] = []
    answers = [trio.Event(), trio.Event()]
    kept = [1, 3]

    async def ask_many(clients: int) -> tuple[int, int]:
        call = len(asked)
        asked.append(clients)
        await answers[call].wait()
        return kept[call], 7 + call  # the round of each answer

    results: dict[int, tuple[bool, int]] = {}

    async def client(index: int) -> None:
        results[index] = await batcher.ask()

    async with trio.open_nursery() as nursery:
        batcher = Batcher(nursery, ask_many)
        nursery.start_soon(client, 0)
        await trio.testing.wait_all_tasks_blocked()
        for index in range(1, 6):  # arrive while the first call is in flight
            nursery.start_soon(client, index)
            await trio.testing.wait_all_tasks_blocked()
        assert asked == [1]
        answers[0].set()
        await trio.testing.wait_all_tasks_blocked()
        assert asked == [1, 5]
        answers[1].set()
    # Client 0 alone, then the first three of the five that waited.
    assert results == {
        0: (True, 7), 1: (True, 8), 2: (True, 8), 3: (True, 8), 4: (False, 0), 5: (False, 0)
    }  # fmt: skip


async def test_batcher_gives_every_client_of_a_failed_call_its_error() -> None:
    release = trio.Event()

    async def ask_many(clients: int) -> tuple[int, int]:
        await release.wait()
        raise ConnectionError(f"unreachable ({clients} asked)")

    errors: list[str] = []

    async def client() -> None:
        try:
            await batcher.ask()
        except ConnectionError as error:
            errors.append(str(error))

    async with trio.open_nursery() as nursery:
        batcher = Batcher(nursery, ask_many)
        for _ in range(3):
            nursery.start_soon(client)
            await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert errors == ["unreachable (1 asked)", "unreachable (2 asked)", "unreachable (2 asked)"]


class OldCoordinator(fl_intra_grpc.FlIntraServicer):
    """Serves only FlIntra, as the Go coordinator: refuses every client, records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def ClientCountUpdate(self, message: fl_intra_pb2.ClientCount) -> Any:
        self.calls.append((message.id, message.count))
        return fl_intra_pb2.FlClientStatus(accepted=False)


async def test_selector_falls_back_to_one_call_per_client_with_an_old_coordinator(
    layout: Layout, nursery: trio.Nursery, caplog
) -> None:
    caplog.set_level(logging.INFO)
    old = OldCoordinator()
    port = await nursery.start(serve_grpc, [old.service], "127.0.0.1", 0)
    options = SelectorOptions(coordinator=f"127.0.0.1:{port}", layout=layout, waiting_time_ms=750)
    selector_id = await nursery.start(Selector(options).serve)

    assert await refused_wait_ms(selector_id) == 750
    assert await refused_wait_ms(selector_id) == 750
    assert old.calls == [(selector_id, 1), (selector_id, 2)]
    fallbacks = [r for r in caplog.records if "no batched check-in" in r.getMessage()]
    assert len(fallbacks) == 1  # learnt once, not retried per client


async def test_a_coordinator_that_never_answers_costs_a_client_one_call_timeout(
    layout: Layout, autojump_clock: trio.testing.MockClock, caplog
) -> None:
    """A peer that accepts the connection and says nothing (purerpc would wait forever)."""
    async with trio.open_nursery() as nursery:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        silent: list[trio.SocketStream] = []

        async def accept_and_keep_quiet() -> None:
            silent.append(await listener.accept())

        nursery.start_soon(accept_and_keep_quiet)
        port = listener.socket.getsockname()[1]
        options = SelectorOptions(
            coordinator=f"127.0.0.1:{port}", layout=layout, waiting_time_ms=750, call_timeout=30
        )
        selector_id = await nursery.start(Selector(options).serve)
        started = trio.current_time()
        assert await refused_wait_ms(selector_id) == 750  # refused, told to come back
        assert trio.current_time() - started == pytest.approx(30, abs=1)
        assert any("could not ask the coordinator" in r.getMessage() for r in caplog.records)
        nursery.cancel_scope.cancel()
