"""The reference selector against coordinators of both wires: what it calls, what it logs.

* Against a coordinator that serves only the Go contract's ``FlIntra`` (our own
  coordinator's round task and FlIntra servicer, without the extension),
  every ``/flcoordinator.v1.FlIntraBatch/*`` call is answered UNIMPLEMENTED: the
  selector falls back, once and for good, to one ``ClientCountUpdate`` per client
  and ``SelectorAggregationComplete`` for its report, and the round completes.
* With our extension, ``GoalCountReached`` may overtake the check-in answer that
  says which round the clients are for: the selector's "goal reached" line still
  names the coordinator's round number, not its own count ("cohort 1").
"""

from __future__ import annotations

import functools
import logging
import urllib.parse
from pathlib import Path

import grpc
import h2.events
import purerpc
import pytest
import trio
from helpers.h2peer import RawPeer, framed, padded
from helpers.peers import assert_arrays_close, fedavg, read_floats

from fl_coordinator._proto import (
    fl_intra_batch_grpc,
    fl_intra_batch_pb2,
    fl_intra_grpc,
    fl_intra_pb2,
    fl_round_pb2,
)
from fl_coordinator.app import build_coordinator, serve
from fl_coordinator.config import Settings
from fl_coordinator.federation.client import SelectorCalls
from fl_coordinator.federation.selector import Selector, SelectorOptions
from fl_coordinator.rpc.listener import serve_grpc
from fl_coordinator.rpc.servicers import CheckIns, IntraServicer
from fl_coordinator.status.hub import StatusHub
from fl_coordinator.storage.layout import Layout

SELECTOR_LOG = "fl_coordinator.federation.selector"
WEIGHTS = (3, 5)


class GoContractServicer(IntraServicer):
    """Our coordinator's FlIntra servicer, recording the calls it is made."""

    def __init__(self, check_ins: CheckIns) -> None:
        super().__init__(check_ins)
        self.calls: list[str] = []

    async def ClientCountUpdate(
        self, message: fl_intra_pb2.ClientCount
    ) -> fl_intra_pb2.FlClientStatus:
        self.calls.append("ClientCountUpdate")
        return await super().ClientCountUpdate(message)

    async def SelectorAggregationComplete(
        self, message: fl_intra_pb2.SelectorId
    ) -> fl_intra_pb2.Empty:
        self.calls.append("SelectorAggregationComplete")
        return await super().SelectorAggregationComplete(message)


async def take_part(selector_id: str, work: Path, update: Path, weight: int) -> None:
    """One client: check in (accepted at once: the goal needs it), download, upload."""
    calls = SelectorCalls(selector_id, work)
    async with trio.open_nursery() as nursery:
        calls.connect(nursery)
        assert await calls.check_in() is None
        await calls.upload(update, weight)
        nursery.cancel_scope.cancel()


async def test_against_a_go_contract_coordinator_the_selector_falls_back_for_good(
    settings: Settings, layout: Layout, keras_weights: list[Path], tmp_path: Path,
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    settings = settings.replace(checkin_limit=2)
    hub = StatusHub(settings.problem_id, str(layout.checkpoint))
    completed = trio.Event()
    done: list[dict] = []

    def observe(message: dict) -> None:
        if message["stage"] == "COMPLETED":
            done.append(message)
            completed.set()

    hub.observe(observe)
    coordinator = build_coordinator(settings, layout, hub)
    await nursery.start(coordinator.run)
    servicer = GoContractServicer(CheckIns(coordinator))
    port = await nursery.start(functools.partial(serve_grpc, [servicer.service], "127.0.0.1", 0))
    before = read_floats(layout.checkpoint)

    caplog.set_level(logging.INFO, logger=SELECTOR_LOG)
    selector = Selector(SelectorOptions(coordinator=f"127.0.0.1:{port}", layout=layout))
    await nursery.start(selector.serve)
    with trio.fail_after(60):
        async with trio.open_nursery() as clients:
            for k, weight in enumerate(WEIGHTS):
                clients.start_soon(take_part, selector.id, tmp_path / f"client{k}",
                                   keras_weights[k], weight)  # fmt: skip
        await completed.wait()

    assert servicer.calls == ["ClientCountUpdate"] * 2 + ["SelectorAggregationComplete"]
    assert [(m["round"], m["accepted"], m["reported"]) for m in done] == [(1, 2, [selector.id])]
    expected = fedavg(before, list(zip(keras_weights, WEIGHTS, strict=False)))
    assert_arrays_close(read_floats(layout.checkpoint), expected)
    said = [r.getMessage() for r in caplog.records if r.name == SELECTOR_LOG]
    assert said.count("the coordinator has no batched check-in; asking once per client") == 1
    # The old wire names no round: the selector's own count names it.
    assert "cohort 1: goal reached; sending files to 2 client(s) (0 more awaiting the " \
        "coordinator's answer)" in said  # fmt: skip
    assert "cohort 1: reported to the coordinator" in said


class OvertakingCoordinator(fl_intra_batch_grpc.FlIntraBatchServicer):
    """Says GoalCountReached to a selector before answering its check-in (round 7)."""

    async def CheckInClients(
        self, message: fl_intra_batch_pb2.ClientBatch
    ) -> fl_intra_batch_pb2.ClientsAccepted:
        if not message.clients:  # the selector's start-up call
            return fl_intra_batch_pb2.ClientsAccepted(accepted=0, round=7)
        host, port = message.id.rsplit(":", 1)
        async with purerpc.insecure_channel(host, int(port)) as channel:
            await fl_intra_grpc.FLGoalCountBroadcastStub(channel).GoalCountReached(
                fl_intra_pb2.Empty()
            )
        return fl_intra_batch_pb2.ClientsAccepted(accepted=message.clients, round=7)


async def test_goal_reached_before_the_answer_is_logged_with_the_coordinators_round(
    layout: Layout, tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    service = OvertakingCoordinator().service
    port = await nursery.start(functools.partial(serve_grpc, [service], "127.0.0.1", 0))
    caplog.set_level(logging.INFO, logger=SELECTOR_LOG)
    selector = Selector(SelectorOptions(coordinator=f"127.0.0.1:{port}", layout=layout))
    await nursery.start(selector.serve)
    calls = SelectorCalls(selector.id, tmp_path / "client")
    with trio.fail_after(30):
        async with trio.open_nursery() as client:
            calls.connect(client)
            assert await calls.check_in() is None  # accepted, then sent initFiles/
            client.cancel_scope.cancel()
    said = [r.getMessage() for r in caplog.records if "goal reached" in r.getMessage()]
    assert said == [
        "round 7: goal reached; sending files to 1 client(s) (0 more awaiting the "
        "coordinator's answer)"
    ]


def selector_refusals(selector_id: str) -> list[tuple[grpc.StatusCode, str]]:
    """A GoalCountReached and a client's CheckIn of 1 MiB each (a valid message and an
    unknown field), over grpcio: the code and details of each failure."""
    failures = []
    with grpc.insecure_channel(selector_id) as channel:
        told = channel.unary_unary(
            "/FLGoalCountBroadcast/GoalCountReached",
            request_serializer=lambda request: request,
            response_deserializer=fl_intra_pb2.Empty.FromString,
        )
        check_in = channel.stream_stream(
            "/FlRound/CheckIn",
            request_serializer=lambda request: request,
            response_deserializer=fl_round_pb2.FlData.FromString,
        )
        large = 1 << 20
        hello = fl_round_pb2.CheckInRequest(message="hi")
        calls = (
            lambda: told(padded(fl_intra_pb2.Empty(), large), timeout=30),
            lambda: list(check_in(iter([padded(hello, large)]), timeout=30)),
        )
        for call in calls:
            with pytest.raises(grpc.RpcError) as refused:
                call()
            failures.append((refused.value.code(), refused.value.details()))
    return failures


async def test_the_selectors_small_requests_are_refused_past_their_limit(
    settings: Settings, layout: Layout, nursery: trio.Nursery
) -> None:
    """The reference selector's GoalCountReached and CheckIn (small by the protocol) are
    refused past 16 KiB with RESOURCE_EXHAUSTED (before: read whole and parsed; a client's
    check-in is held for a whole round)."""
    endpoints = await nursery.start(serve, settings)
    selector = Selector(SelectorOptions(f"127.0.0.1:{endpoints.grpc_port}", layout))
    await nursery.start(selector.serve)
    failures = await trio.to_thread.run_sync(selector_refusals, selector.id)
    assert [code for code, _ in failures] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert [details.split(",")[0] for _, details in failures] == [
        "request message larger than the limit of 16384 bytes for "
        "/FLGoalCountBroadcast/GoalCountReached",
        "request message larger than the limit of 16384 bytes for /FlRound/CheckIn",
    ]
    # A CheckIn under way (its first message in, its answer begun) whose second is large.
    status = await trio.to_thread.run_sync(second_message_too_large, selector.id)
    assert status["grpc-status"] == "8"
    message = urllib.parse.unquote(status["grpc-message"])
    assert message.startswith("request message larger than the limit of 16384 bytes for /FlRound")


def second_message_too_large(selector_id: str) -> dict[str, str]:
    """A raw CheckIn stream: a small message, the answer's headers (its call started), then a
    1 MiB one: the trailers of the answer."""
    peer = RawPeer(int(selector_id.rsplit(":", 1)[1]), timeout=30)
    try:
        hello = fl_round_pb2.CheckInRequest(message="hi")
        stream_id = peer.open_stream("/FlRound/CheckIn", framed(padded(hello, 0)))
        peer.send()
        peer.receive_until(
            lambda events: any(
                isinstance(e, h2.events.ResponseReceived) and e.stream_id == stream_id
                for e in events
            )
        )
        peer.push(stream_id, framed(padded(hello, 1 << 20)))
        peer.receive_until(lambda events: peer.answer(stream_id) is not None)
        return peer.answer(stream_id) or {}
    finally:
        peer.close()
