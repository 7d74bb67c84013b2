"""Our extension of the wire (FlIntraBatch), end to end with grpcio: check-ins that name their
round, releases of clients a selector let go, reports that name their round."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import trio
from helpers.peers import FakeSelector, completed, serve_and_watch, write_aggregate

from fl_coordinator._proto import fl_intra_batch_pb2 as pb
from fl_coordinator.config import Settings
from fl_coordinator.storage.layout import Layout

SERVICE = "/flcoordinator.v1.FlIntraBatch/"


class ExtensionClient:
    """grpcio, method paths spelled out by hand (a wrong path in our proto would show)."""

    def __init__(self, port: int) -> None:
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def _method(self, name: str, reply: Any) -> Callable[[Any], Any]:
        call = self._channel.unary_unary(
            SERVICE + name,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=reply.FromString,
        )
        return lambda request: call(request, timeout=30)

    async def call(self, name: str, request: Any, reply: Any) -> Any:
        return await trio.to_thread.run_sync(self._method(name, reply), request)

    async def check_in(self, selector: str, clients: int) -> tuple[int, int]:
        request = pb.ClientBatch(id=selector, clients=clients)
        answer = await self.call("CheckInClients", request, pb.ClientsAccepted)
        return answer.accepted, answer.round

    async def release(self, selector: str, clients: int, round: int) -> int:
        request = pb.ClientRelease(id=selector, clients=clients, round=round)
        return (await self.call("ReleaseClients", request, pb.ClientsReleased)).released

    async def report(self, selector: str, round: int) -> bool:
        request = pb.AggregateReport(id=selector, round=round)
        return (await self.call("ReportAggregate", request, pb.ReportAnswer)).taken

    def close(self) -> None:
        self._channel.close()


async def test_released_clients_are_not_counted_twice(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """Issue 13's case: goal 6, three real clients let go after the hold timeout and back again."""
    endpoints, watcher, _ = await serve_and_watch(nursery, settings.replace(checkin_limit=6))
    selector = await FakeSelector().start(nursery)
    client = ExtensionClient(endpoints.grpc_port)
    try:
        assert await client.check_in(selector.id, 3) == (3, 1)
        assert await client.release(selector.id, 3, round=1) == 3
        assert await client.check_in(selector.id, 3) == (3, 1)  # the same three, again
        shown = await watcher.wait_for(lambda m: m["stage"] == "SELECTION" and m["accepted"] == 3)
        assert shown["selectors"] == [selector.id]
        assert await client.release(selector.id, 1, round=0) == 0  # not this round: nothing
        assert await client.release("../x:1", 1, round=1) == 0  # hostile id: refused
        assert await client.check_in(selector.id, 3) == (3, 1)  # three more: the goal of 6
        await watcher.wait_for(lambda m: m["stage"] == "CONFIGURATION" and m["accepted"] == 6)
        assert await client.release(selector.id, 2, round=1) == 0  # goal reached: too late
    finally:
        client.close()
    await selector.told.receive()


async def test_a_report_names_its_round_and_a_stale_one_is_refused(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery
) -> None:
    """Issue 13's case: the report of an abandoned round must not count for the next one."""
    endpoints, watcher, _ = await serve_and_watch(nursery, settings.replace(checkin_limit=1))
    selector = await FakeSelector().start(nursery)
    client = ExtensionClient(endpoints.grpc_port)
    try:
        assert await client.check_in(selector.id, 1) == (1, 1)
        await selector.told.receive()
        write_aggregate(layout, selector.id, keras_weights[0], weight=2)
        assert await client.report(selector.id, round=0) is False  # an older round's
        configuring = await watcher.wait_for(lambda m: bool(m["ignored"]))
        assert configuring["stage"] == "CONFIGURATION"
        assert configuring["ignored"] == [[selector.id, "it is for round 0, not this one"]]
        assert await client.report(selector.id, round=1) is True
        assert (await watcher.wait_for(completed(1)))["stage"] == "COMPLETED"
        assert await client.report(selector.id, round=1) is False  # round 1 is over
    finally:
        client.close()
