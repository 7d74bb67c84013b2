"""Status fan-out: bounded per-subscriber queues, the websocket endpoint, the webhook."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import trio
import trio_websocket
from helpers.http_sink import HttpSink
from helpers.peers import FakeSelector, PurerpcClient, watch

from fl_coordinator.app import serve
from fl_coordinator.core.events import Status
from fl_coordinator.core.stages import Stage
from fl_coordinator.retry import RetryPolicy
from fl_coordinator.status.hub import StatusHub
from fl_coordinator.status.webhook import run_webhook


def snapshot(accepted: int, stage: Stage = Stage.SELECTION) -> Status:
    return Status(round=1, stage=stage, accepted=accepted, goal=1000, selectors=(), reported=())


def test_message_schema() -> None:
    hub = StatusHub(
        "digits", "/d/initFiles/fl_checkpoint", clock=lambda: datetime(2026, 1, 2, tzinfo=UTC)
    )
    done = Status(
        round=4,
        stage=Stage.COMPLETED,
        accepted=2,
        goal=2,
        selectors=("a:1",),
        reported=("a:1",),
        configured=("a:1",),
        aggregation_seconds=0.5,
    )
    assert hub.publish(done) == {
        "problem_id": "digits", "seq": 1, "time": "2026-01-02T00:00:00.000Z", "round": 4,
        "stage": "COMPLETED", "accepted": 2, "goal": 2, "selectors": ["a:1"],
        "reported": ["a:1"], "configured": ["a:1"], "unreachable": [], "rejected": {},
        "ignored": [], "aggregating": False,
        "held": 0, "checkpoint": "/d/initFiles/fl_checkpoint", "aggregation_seconds": 0.5,
        "stage_started": "2026-01-02T00:00:00.000Z",
        "stages": {"COMPLETED": "2026-01-02T00:00:00.000Z"},
    }  # fmt: skip
    failed = hub.publish(Status(5, Stage.FAILED, 0, 2, (), (), error="bad file"))
    assert (failed["seq"], failed["error"]) == (2, "bad file")
    assert "checkpoint" not in failed


def test_each_stage_keeps_the_time_it_began() -> None:
    """A webserver draws a timeline from one message: no bookkeeping of its own."""
    ticks = iter(range(10))
    hub = StatusHub("p", "c", clock=lambda: datetime(2026, 1, 2, 0, 0, next(ticks), tzinfo=UTC))

    def at(second: int) -> str:
        return f"2026-01-02T00:00:{second:02d}.000Z"

    hub.publish(snapshot(0))
    hub.publish(snapshot(1))  # same stage: its start stays
    configuring = hub.publish(snapshot(2, Stage.CONFIGURATION))
    assert configuring["stage_started"] == at(2)
    assert configuring["stages"] == {"SELECTION": at(0), "CONFIGURATION": at(2)}
    aggregating = Status(1, Stage.REPORTING, 2, 1000, (), (), aggregating=True)
    hub.publish(Status(1, Stage.REPORTING, 2, 1000, (), ()))
    last = hub.publish(aggregating)
    assert last["stage_started"] == at(3)  # REPORTING began at 3, aggregating at 4
    assert last["stages"] == {"SELECTION": at(0), "CONFIGURATION": at(2), "REPORTING": at(3),
                              "AGGREGATING": at(4)}  # fmt: skip
    following = hub.publish(Status(2, Stage.SELECTION, 0, 1000, (), ()))
    assert following["stages"] == {"SELECTION": at(5)}  # a new round, a new timeline


async def test_a_subscriber_that_never_reads_only_loses_old_messages() -> None:
    hub = StatusHub("p", "c", queue_length=8)
    with hub.subscribe() as stuck, hub.subscribe() as reader:
        for accepted in range(100):
            hub.publish(snapshot(accepted))  # synchronous: cannot wait on anyone
            assert (await reader.get())["accepted"] == accepted
        assert stuck.dropped == 92
        kept = [(await stuck.get())["accepted"] for _ in range(8)]
        assert kept == list(range(92, 100))  # the newest survive
    assert hub.subscriber_count == 0


async def test_new_subscriber_first_gets_current_status() -> None:
    hub = StatusHub("p", "c")
    hub.publish(snapshot(1))
    hub.publish(snapshot(2))
    with hub.subscribe() as late:
        assert (await late.get())["accepted"] == 2
        hub.publish(snapshot(3))
        assert (await late.get())["accepted"] == 3


async def test_websocket_other_paths_are_refused(settings, nursery: trio.Nursery) -> None:
    endpoints = await nursery.start(serve, settings)
    with pytest.raises(trio_websocket.ConnectionRejected) as raised:
        async with trio_websocket.open_websocket(
            "127.0.0.1", endpoints.status_port, "/other", use_ssl=False
        ):
            pass
    assert raised.value.status_code == 404


async def test_webhook_gets_every_message_and_retries(settings, nursery: trio.Nursery) -> None:
    sink = HttpSink(statuses=[503, 500])  # the first message needs three attempts
    await nursery.start(sink.serve)
    hub = StatusHub("p", "c")
    await nursery.start(
        run_webhook, hub, sink.url, RetryPolicy(attempts=3, first_wait=0.01, jitter=0)
    )
    for accepted in range(3):
        hub.publish(snapshot(accepted))
    await sink.wait_for(3)
    assert [body["accepted"] for body in sink.bodies] == [0, 1, 2]
    assert sink.attempts == 5


async def test_webhook_down_does_not_stop_the_round(settings, nursery: trio.Nursery) -> None:
    sink = HttpSink(statuses=[500] * 1000)
    await nursery.start(sink.serve)
    endpoints = await nursery.start(serve, settings.replace(webhook_url=sink.url))
    selector = await FakeSelector().start(nursery)
    watcher = await watch(nursery, endpoints.status_url)
    client = PurerpcClient(endpoints.grpc_port)
    assert [await client.check_in(selector.id) for _ in range(3)] == [True, True, False]
    await selector.told.receive()
    configured = await watcher.wait_for(lambda m: m["stage"] == "CONFIGURATION")
    assert configured["accepted"] == 2
    assert sink.bodies == []
