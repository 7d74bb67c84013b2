"""The legacy status push (``LEGACY_STATUS_PUSH``): what a grpcio ``FlStatus`` webserver receives
from a real coordinator, through rounds, a failed round and an outage; a stalled webserver, and
one that answers errors; the bounded queue; and the stage changes that status messages imply."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing
from helpers.legacy_webserver import LegacyWebserver, StalledWebserver
from helpers.peers import FakeSelector, completed, run_round, serve_and_watch

from fl_coordinator._proto import fl_status_pb2
from fl_coordinator.config import ConfigError, Settings, load_settings
from fl_coordinator.core.events import Status
from fl_coordinator.core.stages import Stage
from fl_coordinator.retry import RetryPolicy
from fl_coordinator.status.hub import StatusHub
from fl_coordinator.status.legacy_push import LegacyStatus, run_legacy_push, stage_changes
from fl_coordinator.storage.layout import Layout

_WIRE = ("SELECTION", "CONFIGURATION", "REPORTING", "COMPLETED")


@pytest.fixture
def webservers() -> Iterator[Callable[..., LegacyWebserver]]:
    """Makes grpcio webservers, stopped once the test's trio run (and every push) has ended:
    a grpcio server stopping under a push sends GOAWAY, and purerpc fails that push."""
    made: list[LegacyWebserver] = []

    def make(failures: int = 0) -> LegacyWebserver:
        made.append(LegacyWebserver(failures))
        return made[-1]

    yield make
    for webserver in made:
        webserver.stop()


def whole_round(round_no: int) -> list[tuple[str, int]]:
    return [(stage, round_no) for stage in _WIRE]


def pushes(messages: list[tuple[int, str]]) -> list[tuple[str, int]]:
    """The pushes :func:`stage_changes` makes of (round, stage) messages, in order."""
    last: LegacyStatus | None = None
    made = []
    for round_no, stage in messages:
        message: Any = {"round": round_no, "stage": stage}
        for push in stage_changes(last, message):
            made.append(push)
            last = push
    return [(fl_status_pb2.Stages.Name(push.stage), push.round_no) for push in made]


def test_each_wire_stage_of_each_round_once_from_round_no_0() -> None:
    messages = [
        (1, "SELECTION"), (1, "SELECTION"), (1, "SELECTION"),  # check-ins
        (1, "CONFIGURATION"), (1, "REPORTING"), (1, "REPORTING"),  # aggregating: REPORTING too
        (1, "COMPLETED"), (2, "SELECTION"), (2, "CONFIGURATION"), (2, "FAILED"),
        (3, "SELECTION"), (3, "FINISHED"),
    ]  # fmt: skip
    assert pushes(messages) == [
        *whole_round(0), ("SELECTION", 1), ("CONFIGURATION", 1), ("SELECTION", 2)
    ]  # fmt: skip


def test_stages_that_snapshots_skipped_are_filled_in_and_older_ones_ignored() -> None:
    # The hub drops a slow subscriber's oldest snapshots: what a later one implies is pushed.
    assert pushes([(4, "SELECTION"), (4, "COMPLETED")]) == whole_round(3)
    assert pushes([(4, "CONFIGURATION"), (6, "REPORTING")]) == [
        ("SELECTION", 3), ("CONFIGURATION", 3),
        ("SELECTION", 5), ("CONFIGURATION", 5), ("REPORTING", 5),
    ]  # fmt: skip
    assert pushes([(4, "REPORTING"), (4, "SELECTION"), (3, "COMPLETED")]) == whole_round(3)[:3]
    assert pushes([(1, "FINISHED")]) == []


async def test_legacy_webserver_sees_every_stage_in_order_after_an_outage_and_a_failed_round(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery, webservers
) -> None:
    webserver = webservers()  # down until round 1 has completed
    settings = settings.replace(
        checkin_limit=1, legacy_status_push=True, webserver_address=webserver.address
    )
    endpoints, watcher, client = await serve_and_watch(nursery, settings)
    port = endpoints.grpc_port
    first = await run_round(nursery, port, watcher, layout, [(keras_weights[0], 2)], 1)
    assert first["stage"] == "COMPLETED"
    webserver.start()

    selector = await FakeSelector().start(nursery)
    assert await client.check_in(selector.id) is True
    await selector.told.receive()
    await client.report(selector.id)  # it wrote no files: the round fails in REPORTING
    assert (await watcher.wait_for(completed(2)))["stage"] == "FAILED"

    third = await run_round(nursery, port, watcher, layout, [(keras_weights[1], 3)], 3)
    assert third["stage"] == "COMPLETED"
    await webserver.wait_for(("SELECTION", 3))  # round 4 opened
    assert webserver.received.items == [
        *whole_round(0),
        ("SELECTION", 1), ("CONFIGURATION", 1), ("REPORTING", 1),  # FAILED: nothing more
        *whole_round(2),
        ("SELECTION", 3),
    ]  # fmt: skip


async def test_a_stalled_webserver_does_not_delay_a_round(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery
) -> None:
    stalled = StalledWebserver()
    await nursery.start(stalled.serve)
    settings = settings.replace(
        checkin_limit=2, legacy_status_push=True, webserver_address=stalled.address
    )
    endpoints, watcher, _ = await serve_and_watch(nursery, settings)
    await stalled.connected.wait()  # the first push hangs there (for 5 s, then again)
    sources = [(keras_weights[0], 2), (keras_weights[1], 5)]
    with trio.fail_after(60):  # never a hang: a push in the round's way would retry forever
        done = await run_round(nursery, endpoints.grpc_port, watcher, layout, sources)
        await watcher.wait_for(lambda m: m["round"] == 2)
    assert done["stage"] == "COMPLETED"
    assert watcher.stages()[:5] == [
        (1, "SELECTION"), (1, "CONFIGURATION"), (1, "REPORTING"), (1, "COMPLETED"),
        (2, "SELECTION"),
    ]  # fmt: skip


async def test_the_queue_keeps_the_latest_stage_changes_and_logs_drops_once(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, webservers
) -> None:
    hub = StatusHub("p", "c")
    webserver = webservers()  # down while 100 rounds go by
    drops = 0

    def dropped() -> None:
        nonlocal drops
        drops += 1

    retry = RetryPolicy(attempts=None, first_wait=0.01, max_wait=0.05, jitter=0)
    logger = "fl_coordinator.status.legacy_push"
    with caplog.at_level(logging.WARNING, logger=logger):
        push = functools.partial(run_legacy_push, queue_length=8, dropped=dropped)
        await nursery.start(push, hub, webserver.address, retry)
        for number in range(1, 101):
            for stage in (Stage.SELECTION, Stage.CONFIGURATION, Stage.REPORTING, Stage.COMPLETED):
                hub.publish(Status(number, stage, 1, 1, ("a:1",), ()))
                await trio.testing.wait_all_tasks_blocked()
        lines = [r.getMessage() for r in caplog.records if r.name == logger]
    assert drops == 4 * 100 - 8
    webserver.start()
    await webserver.wait_for(("COMPLETED", 99))
    assert webserver.received.items == [*whole_round(98), *whole_round(99)]
    assert lines == [
        f"legacy status push to {webserver.address}: 8 stage changes waiting, "
        "dropped the oldest (SELECTION of roundNo 0)"
    ]  # the other 391 are counted in the next line, a minute later


async def test_a_push_answered_with_an_error_is_sent_again(
    nursery: trio.Nursery, webservers
) -> None:
    hub = StatusHub("p", "c")
    webserver = webservers(failures=2)
    webserver.start()
    retry = RetryPolicy(attempts=None, first_wait=0.01, jitter=0)
    await nursery.start(run_legacy_push, hub, webserver.address, retry)
    hub.publish(Status(7, Stage.CONFIGURATION, 1, 1, ("a:1",), ()))
    await webserver.wait_for(("CONFIGURATION", 6))
    assert webserver.received.items == [("SELECTION", 6), ("CONFIGURATION", 6)]
    assert webserver.calls == 4  # two refused, then each push once


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:0", "a port >= 1"), ("localhost:50052", "not this coordinator's STATUS_PORT")],
)
def test_the_push_needs_an_address_that_is_not_its_own_status_port(
    address: str, expected: str
) -> None:
    environ = {"LEGACY_STATUS_PUSH": "true", "WEBSERVER_ADDRESS": address}
    with pytest.raises(ConfigError, match=expected):
        load_settings({}, environ)
    settings, _ = load_settings({}, {"LEGACY_STATUS_PUSH": "yes", "WEBSERVER_ADDRESS": "w:50053"})
    assert (settings.legacy_status_push, settings.webserver_address) == (True, "w:50053")
    yaml_values = {"LEGACY_STATUS_PUSH": True, "WEBSERVER_ADDRESS": "w:50053"}
    assert load_settings(yaml_values, {})[0].legacy_status_push is True
    assert load_settings({}, {})[0].legacy_status_push is False
