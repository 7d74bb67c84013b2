"""The served coordinator in situations other than the happy path, over real sockets."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from datetime import UTC, datetime, timedelta

import h2.events
import pytest
import trio
import trio.testing
from helpers.h2peer import CHECK_IN, RawPeer, check_in_body, framed, padded
from helpers.peers import (
    UPGRADE,
    FakeSelector,
    GrpcioClient,
    aggregating_round,
    assert_arrays_close,
    completed,
    fedavg,
    read_floats,
    serve_and_watch,
    write_aggregate,
)
from helpers.resources import check_workers, out_of_descriptors, peak_rss, reset_peak, when_logged

from fl_coordinator._proto import fl_intra_pb2
from fl_coordinator.app import build_coordinator
from fl_coordinator.config import Settings
from fl_coordinator.coordinator import _phase, _publish_first
from fl_coordinator.core.events import Stage, Status
from fl_coordinator.core.stopping import RoundMetrics
from fl_coordinator.status.hub import StatusHub
from fl_coordinator.storage import checker
from fl_coordinator.storage.journal import remember
from fl_coordinator.storage.layout import Layout
from fl_coordinator.untrusted_text import cut


def digest(layout: Layout) -> str:
    return hashlib.sha256(layout.checkpoint.read_bytes()).hexdigest()


async def test_check_in_during_aggregation_is_accepted_into_next_round(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery
) -> None:
    _, watcher, client, release = await aggregating_round(settings, layout, keras_weights, nursery)
    second = await FakeSelector().start(nursery)

    answers: list[bool] = []

    async def late_check_in() -> None:
        answers.append(await client.check_in(second.id))

    nursery.start_soon(late_check_in)
    held = await watcher.wait_for(lambda m: m["held"] == 1)
    assert (held["round"], held["stage"], held["aggregating"]) == (1, "REPORTING", True)
    assert answers == []  # held, not refused
    release.set()

    await second.told.receive()  # round 2 reached its goal with the held client
    round2 = await watcher.wait_for(lambda m: m["round"] == 2 and m["stage"] == "CONFIGURATION")
    assert answers == [True]
    assert (round2["accepted"], round2["selectors"], round2["held"]) == (1, [second.id], 0)
    assert (await watcher.wait_for(completed(1)))["stage"] == "COMPLETED"


async def test_a_held_check_in_whose_connection_closes_is_not_admitted(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery
) -> None:
    """A check-in held while the round aggregates, then its peer closes the connection.

    Before: the next round admitted it (and reached its goal of 1 with it),
    counting a client no selector knew it held; only "a selector gave up
    waiting" was logged. Now the round forgets it when the caller is gone.
    """
    endpoints, watcher, _, release = await aggregating_round(
        settings, layout, keras_weights, nursery
    )

    peer = await trio.to_thread.run_sync(RawPeer, endpoints.grpc_port)
    peer.open_stream(CHECK_IN, check_in_body("127.0.0.1:9"), end=True)
    await trio.to_thread.run_sync(peer.send)
    held = await watcher.wait_for(lambda m: m["held"] == 1)
    assert (held["round"], held["aggregating"]) == (1, True)
    peer.close()
    after = len(watcher.messages)
    # the next snapshot: the held check-in is forgotten while the round still aggregates
    gone = await watcher.wait_for(lambda m: any(m is x for x in watcher.messages[after:]))
    assert (gone["round"], gone["aggregating"], gone["held"]) == (1, True, 0)
    release.set()

    round2 = await watcher.wait_for(lambda m: m["round"] == 2)
    assert (round2["stage"], round2["accepted"], round2["selectors"]) == ("SELECTION", 0, [])
    assert (await watcher.wait_for(completed(1)))["stage"] == "COMPLETED"


async def test_a_check_in_held_longer_than_the_idle_timeout_keeps_its_connection(
    settings: Settings,
    layout: Layout,
    keras_weights,
    nursery: trio.Nursery,
    mock_clock: trio.testing.MockClock,
) -> None:
    """A check-in held while the round aggregates for more than IDLE_CONNECTION_TIMEOUT
    (a large model): its connection stays open and it is answered (accepted) when the
    aggregation ends. (On trio's MockClock at the real clock's rate, made to jump past
    the idle time once the check-in is held.)

    Before: the connection counted as idle (no traffic while the method waited), was
    closed with a GOAWAY after IDLE_CONNECTION_TIMEOUT and the check-in cancelled.
    """
    idle = 30.0
    mock_clock.rate = 1.0  # the round's own waits (a report settling) as on the real clock
    endpoints, watcher, _, release = await aggregating_round(
        settings.replace(idle_connection_timeout=idle), layout, keras_weights, nursery
    )
    peer = await trio.to_thread.run_sync(RawPeer, endpoints.grpc_port)
    stream_id = peer.open_stream(CHECK_IN, check_in_body("127.0.0.1:9"), end=True)
    await trio.to_thread.run_sync(peer.send)
    held = await watcher.wait_for(lambda m: m["held"] == 1)
    assert (held["round"], held["aggregating"]) == (1, True)

    mock_clock.jump(2 * idle)
    await trio.testing.wait_all_tasks_blocked()

    assert await trio.to_thread.run_sync(peer.answers_a_ping) is True
    assert peer.goaway() is None
    release.set()

    def the_answer() -> bytes:
        peer.receive_until(
            lambda events: any(
                isinstance(e, h2.events.TrailersReceived) and e.stream_id == stream_id
                for e in events
            )
        )
        return b"".join(
            e.data
            for e in peer.events
            if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id
        )

    data = await trio.to_thread.run_sync(the_answer)
    assert fl_intra_pb2.FlClientStatus.FromString(data[5:]).accepted is True
    assert peer.goaway() is None
    assert (await watcher.wait_for(completed(1)))["stage"] == "COMPLETED"
    peer.close()


async def test_missing_aggregate_is_rejected_and_round_goes_on_with_the_rest(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery, caplog
) -> None:
    _, watcher, client = await serve_and_watch(nursery, settings)  # min reporting fraction 0.5

    first = await FakeSelector().start(nursery)
    second = await FakeSelector().start(nursery)
    before = read_floats(layout.checkpoint)

    assert [await client.check_in(first.id), await client.check_in(second.id)] == [True, True]
    await first.told.receive()
    await second.told.receive()
    write_aggregate(layout, first.id, keras_weights[0], weight=3)  # second writes nothing
    await client.report(first.id)
    await client.report(second.id)

    done = await watcher.wait_for(completed(1))
    assert done["stage"] == "COMPLETED"
    assert list(done["rejected"]) == [second.id]
    assert str(layout.agg_weight(second.id)) in done["rejected"][second.id]
    assert "missing" in done["rejected"][second.id]
    assert_arrays_close(read_floats(layout.checkpoint), fedavg(before, [(keras_weights[0], 3)]))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"rejected the contribution of {second.id}" in e for e in errors)


async def test_round_fails_and_keeps_checkpoint_when_too_few_usable_reports(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery, caplog
) -> None:
    _, watcher, client = await serve_and_watch(
        nursery, settings.replace(min_reporting_fraction=1.0)
    )
    first = await FakeSelector().start(nursery)
    second = await FakeSelector().start(nursery)
    before = digest(layout)

    assert [await client.check_in(first.id), await client.check_in(second.id)] == [True, True]
    await first.told.receive()
    await second.told.receive()
    write_aggregate(layout, first.id, keras_weights[0], weight=3)
    await client.report(first.id)
    await client.report(second.id)  # its files are missing

    failed = await watcher.wait_for(completed(1))
    assert failed["stage"] == "FAILED"
    assert "only 1 of 2 client(s) reported usable updates" in failed["error"]
    assert str(layout.agg_weight(second.id)) in failed["rejected"][second.id]
    assert digest(layout) == before
    opened = await watcher.wait_for(lambda m: m["round"] == 2)
    assert (opened["stage"], opened["accepted"]) == ("SELECTION", 0)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("round 1: abandoned, global checkpoint kept as it was" in e for e in errors)


async def test_unreachable_selector_does_not_stop_the_others(
    settings: Settings, nursery: trio.Nursery, caplog
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    _, watcher, client = await serve_and_watch(nursery, settings)
    alive = await FakeSelector().start(nursery)
    assert await client.check_in(dead) is True
    assert await client.check_in(alive.id) is True
    await alive.told.receive()
    both = await watcher.wait_for(lambda m: len(m["configured"]) + len(m["unreachable"]) == 2)

    assert (both["configured"], both["unreachable"]) == ([alive.id], [dead])
    assert any(f"could not tell {dead} to configure" in r.getMessage() for r in caplog.records)


HOSTILE_IDS = [
    *("", "..", "../../etc:80", "/abs:1", "a/b:1", "x\0y:1", "no-port", "h:99999"),
    *("a" * 300 + ":1", "bell\x07:1", "del\x7f:1", "new\nline:1"),
    # not printable: C1 controls (NEL, CSI), a line separator, a bidi override
    *("nel\x85:1", "csi\x9b31m:1", "ls\u2028:1", "bidi\u202e:1"),
    # digits that are not ASCII: "²" (int() refuses it), Arabic-Indic 50051
    *("h:\u00b2", "h:\u0665\u0660\u0660\u0665\u0661"),
]


@pytest.mark.parametrize(
    "selector_id",
    HOSTILE_IDS,
)
async def test_hostile_selector_ids_are_refused(
    settings: Settings, nursery: trio.Nursery, selector_id: str, caplog
) -> None:
    _, watcher, client = await serve_and_watch(nursery, settings)
    assert await client.check_in(selector_id) is False
    await client.report(selector_id)  # answered with Empty (asserted inside)
    assert any("check-in refused: selector id" in r.getMessage() for r in caplog.records)
    assert any("report ignored: selector id" in r.getMessage() for r in caplog.records)
    # The round saw nothing: a valid check-in is still the first one accepted.
    fine = await FakeSelector().start(nursery)
    assert await client.check_in(fine.id) is True
    latest = await watcher.wait_for(lambda m: m["accepted"] == 1)
    assert latest["selectors"] == [fine.id]
    shown = [reason for who, reason in latest["ignored"] if who == cut(selector_id)]
    assert shown[0].startswith("check-in refused: selector id") and len(shown) == 2
    assert shown[1].startswith("report ignored: selector id")


async def test_report_from_selector_outside_round_changes_nothing(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery, caplog
) -> None:
    _, watcher, client = await serve_and_watch(nursery, settings)
    member = await FakeSelector().start(nursery)
    stranger = await FakeSelector().start(nursery)
    await client.check_in(member.id)
    await client.check_in(member.id)
    await member.told.receive()
    write_aggregate(layout, stranger.id, keras_weights[1], weight=9)  # files, but no place
    write_aggregate(layout, member.id, keras_weights[0], weight=2)
    await client.report(stranger.id)
    await client.report(member.id)
    done = await watcher.wait_for(completed(1))
    assert (done["stage"], done["reported"], done["rejected"]) == ("COMPLETED", [member.id], {})
    assert stranger.id not in done["selectors"]
    assert any(f"ignored report from {stranger.id!r}" in r.getMessage() for r in caplog.records)


async def test_stalled_subscriber_does_not_delay_the_round(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery
) -> None:
    goal = 150
    endpoints, watcher, client = await serve_and_watch(
        nursery, settings.replace(checkin_limit=goal)
    )
    # A subscriber that completes the handshake, then never reads a byte.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stalled.connect(("127.0.0.1", endpoints.status_port))
    stalled.sendall(UPGRADE)
    selector = await FakeSelector().start(nursery)
    try:
        with trio.fail_after(60):
            for _ in range(goal):
                assert await client.check_in(selector.id) is True
            await selector.told.receive()
            write_aggregate(layout, selector.id, keras_weights[0], weight=goal)
            await client.report(selector.id)
            assert (await watcher.wait_for(completed(1)))["stage"] == "COMPLETED"
    finally:
        stalled.close()
    seqs = [m["seq"] for m in watcher.messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # the healthy one lost nothing


async def test_a_burst_of_check_ins_is_one_step_and_keeps_every_stage(
    settings: Settings, layout: Layout
) -> None:
    """Five check-ins queued at once, goal 3: handled in one step, whose snapshots of the
    same stage collapse into the last one; the stage change itself is never lost."""
    hub = StatusHub("p", "c")
    coordinator = build_coordinator(settings.replace(checkin_limit=3), layout, hub)
    answers: list[int] = []

    async def check_in() -> None:
        answers.append((await coordinator.check_in("127.0.0.1:1")).accepted)  # nobody listens

    async with trio.open_nursery() as nursery:
        with hub.subscribe() as stream:
            await nursery.start(coordinator.run)
            async with trio.open_nursery() as clients:  # all five answered
                for _ in range(5):
                    clients.start_soon(check_in)
            seen = [await stream.get() for _ in range(3)]

            nursery.cancel_scope.cancel()
    assert [(m["stage"], m["accepted"]) for m in seen] == [
        ("SELECTION", 0), ("SELECTION", 2), ("CONFIGURATION", 3),
    ]  # fmt: skip
    assert [m["seq"] for m in seen] == [1, 2, 3]
    assert sorted(answers) == [0, 0, 1, 1, 1]


async def test_a_report_checked_while_out_of_descriptors_fails_the_round_as_ours_not_the_selector(
    settings: Settings,
    layout: Layout,
    keras_weights,
    nursery: trio.Nursery,
    mock_clock: trio.testing.MockClock,
    caplog,
) -> None:
    """The worker checking a report can open no file (EMFILE) for CHECK_TIMEOUT (the clock
    jumps there as the check first says it will try again): round 1 fails as the
    coordinator's (its error says what ran out and what to raise), nobody is rejected, the
    global checkpoint is kept, round 2 opens. In round 2 descriptors are freed while the
    check waits to try again: the report is accepted and averaged. Before, the selector was
    rejected ("internal error: OSError: [Errno 24] ...") and round 1 averaged without it."""
    mock_clock.rate = 1.0  # the round's own waits (a report settling) as on the real clock
    # The check's WARNING is written once a minute (a Throttle): in round 2, its retry's
    # DEBUG line is the one that says it waits.
    caplog.set_level(logging.DEBUG, checker.__name__)
    timeout = 60.0
    served = settings.replace(checkin_limit=2, min_reporting_fraction=0.5, check_workers=1,
                              check_timeout=timeout, idle_connection_timeout=0)  # fmt: skip
    _, watcher, client = await serve_and_watch(nursery, served)
    first, second = [await FakeSelector().start(nursery) for _ in range(2)]
    before = digest(layout)
    global_weights = read_floats(layout.checkpoint)

    async def configured(number: int) -> None:
        assert [await client.check_in(first.id), await client.check_in(second.id)] == [True] * 2
        await first.told.receive()
        await second.told.receive()
        write_aggregate(layout, first.id, keras_weights[0], weight=3)
        await client.report(first.id)
        await watcher.wait_for(lambda m: m["round"] == number and first.id in m["reported"])
        write_aggregate(layout, second.id, keras_weights[1], weight=1)

    await configured(1)
    (worker,) = check_workers()
    with (
        out_of_descriptors(worker),
        when_logged(checker.__name__, "out of its own resources", lambda: mock_clock.jump(timeout)),
    ):
        await client.report(second.id)
        failed = await watcher.wait_for(completed(1))
    assert failed["stage"] == "FAILED"
    assert failed["error"] == (
        f"{layout.selector_dir(second.id)}: these files could not be checked: the coordinator "
        "ran out of its own resources ([Errno 24] Too many open files) and still had none "
        "after trying again for 60 s (CHECK_TIMEOUT); not the selector's fault: raise the "
        "coordinator's RLIMIT_NOFILE (ulimit -n) or memory, or lower CHECK_WORKERS"
    )
    assert (failed["rejected"], failed["reported"]) == ({}, [first.id])
    assert digest(layout) == before
    await watcher.wait_for(lambda m: m["round"] == 2)
    assert watcher.stages()[:5] == [
        (1, "SELECTION"), (1, "CONFIGURATION"), (1, "REPORTING"), (1, "FAILED"), (2, "SELECTION")
    ]  # fmt: skip
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not any("rejected the contribution" in e for e in errors), errors

    await configured(2)
    (worker,) = check_workers()
    with out_of_descriptors(worker) as free, when_logged(checker.__name__, "out of its own", free):
        await client.report(second.id)
        done = await watcher.wait_for(completed(2))
    assert (done["stage"], done["rejected"], done["reported"]) == (
        "COMPLETED", {}, [first.id, second.id]
    )  # fmt: skip
    expected = fedavg(global_weights, [(keras_weights[0], 3), (keras_weights[1], 1)])
    assert_arrays_close(read_floats(layout.checkpoint), expected)


# -- what check-ins held during an aggregation may cost ---------------------------------------

#: A check-in's size: a valid ClientCount padded with an unknown field to almost 4 MiB
#: (under GRPC_MAX_MESSAGE_BYTES: only the method's own limit refuses it).
LARGE_CHECK_IN = 4 * 1024 * 1024 - 1024


def flood(port: int, streams: int, body: bytes) -> tuple[RawPeer, list[int]]:
    """``streams`` check-ins of ``body`` on one connection, each sent whole unless the server
    ends it first: the connection and the streams."""
    peer = RawPeer(port, timeout=60)
    stream_ids = []
    for _ in range(streams):
        stream_ids.append(peer.open_stream(CHECK_IN))
        peer.push(stream_ids[-1], body)
    return peer, stream_ids


def answers(peer: RawPeer, stream_ids: list[int]) -> list[str]:
    """The ``grpc-status`` of each of ``stream_ids``, once all are answered; closes ``peer``."""
    try:
        peer.receive_until(lambda events: all(peer.answer(s) is not None for s in stream_ids))
        return [(peer.answer(s) or {}).get("grpc-status", "none") for s in stream_ids]
    finally:
        peer.close()


async def test_large_check_ins_during_an_aggregation_are_refused_before_they_are_held(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery
) -> None:
    """200 check-ins of almost 4 MiB each (4 connections of 50 streams, every message sent
    whole, after one to warm up) while the round aggregates: each refused with
    RESOURCE_EXHAUSTED, the process's
    peak RSS grows by less than 16 MiB, and a normal check-in is then held as before.

    Before: each was parsed and held until the aggregation ended (rt12: 50 took RSS from
    23 to 223 MiB; these 200 would hold 800 MiB).
    """
    endpoints, watcher, client, release = await aggregating_round(
        settings, layout, keras_weights, nursery, hold=120
    )
    body = framed(padded(fl_intra_pb2.ClientCount(count=1, id="127.0.0.1:9"), LARGE_CHECK_IN))
    warm_up = await trio.to_thread.run_sync(flood, endpoints.grpc_port, 1, body)
    before = reset_peak()
    floods = [warm_up]

    async def one_connection() -> None:
        floods.append(await trio.to_thread.run_sync(flood, endpoints.grpc_port, 50, body))

    async with trio.open_nursery() as peers:
        for _ in range(4):
            peers.start_soon(one_connection)
    grown = peak_rss() - before
    assert grown < 16 * 1024 * 1024, grown / 2**20  # 0.7 MiB here
    statuses = [status for one in floods for status in await trio.to_thread.run_sync(answers, *one)]
    assert statuses == ["8"] * 201
    assert watcher.messages[-1]["held"] == 0 and watcher.messages[-1]["aggregating"] is True

    answered: list[bool] = []
    done = trio.Event()

    async def held_check_in() -> None:
        answered.append(await client.check_in("127.0.0.1:9"))
        done.set()

    nursery.start_soon(held_check_in)
    await watcher.wait_for(lambda m: m["held"] == 1)
    release.set()
    await done.wait()
    round2 = await watcher.wait_for(lambda m: m["round"] == 2 and m["accepted"] == 1)
    assert (answered, round2["selectors"]) == ([True], ["127.0.0.1:9"])


async def test_check_ins_beyond_the_next_rounds_goal_are_answered_at_once_while_aggregating(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery
) -> None:
    """Goal 1: the first check-in during the aggregation is held; 20 more (grpcio and
    purerpc) are refused at once (accepted false: the protocol's "come back later") while
    the aggregation is still held, and the first is accepted into round 2.

    Before: all 21 were held (calls, connections, memory) until the aggregation ended,
    then the 20 refused: a flood during a long aggregation held without bound.
    """
    endpoints, watcher, client, release = await aggregating_round(
        settings, layout, keras_weights, nursery, hold=120
    )
    first = await FakeSelector().start(nursery)
    answered: list[bool] = []
    done = trio.Event()

    async def held_check_in() -> None:
        answered.append(await client.check_in(first.id))
        done.set()

    nursery.start_soon(held_check_in)
    await watcher.wait_for(lambda m: m["held"] == 1)
    grpcio = GrpcioClient(endpoints.grpc_port)
    refused = []
    with trio.fail_after(60):  # (before: no answer until the aggregation ends)
        for index in range(10):
            refused.append(await client.check_in(f"127.0.0.1:{100 + index}"))
            refused.append(await grpcio.check_in(f"127.0.0.1:{200 + index}"))
    grpcio.close()
    assert refused == [False] * 20
    # Snapshots that only change counts are published within _COUNTS_EVERY (0.1 s).
    shown = await watcher.wait_for(lambda m: [i[0] for i in m["ignored"][-1:]] == ["127.0.0.1:209"])
    assert (shown["round"], shown["aggregating"], shown["held"]) == (1, True, 1)
    assert shown["ignored"][-1] == [
        "127.0.0.1:209",
        "check-in refused: the check-ins held for round 2 already bring its goal of 1 "
        "client(s); check in again once its selection opens",
    ]
    assert answered == []
    release.set()
    await first.told.receive()
    await done.wait()
    round2 = await watcher.wait_for(lambda m: m["round"] == 2 and m["stage"] == "CONFIGURATION")
    assert (answered, round2["selectors"], round2["held"]) == ([True], [first.id], 0)


async def test_counts_are_published_at_least_the_interval_apart_by_their_own_times(
    settings: Settings, layout: Layout, mock_clock: trio.testing.MockClock
) -> None:
    """The snapshots of one phase are 0.1 s apart (_COUNTS_EVERY) by the times they carry,
    even when a message takes its time late (the event loop held up by a thread between
    the coordinator's clock and the hub's, 50 ms here: at 2,000 selectors two messages
    were 97 ms apart)."""
    # The clock moves only when every task waits (to the next deadline, the throttle's), and
    # 50 ms once: a check-in that takes its time cannot make up the gap the test asks for.
    mock_clock.autojump_threshold = 0
    late = [0.05]  # the first message's time is taken 50 ms after the coordinator looked

    def clock() -> datetime:
        if late:
            mock_clock.jump(late.pop())
        return datetime.fromtimestamp(1.8e9 + trio.current_time(), UTC)

    hub = StatusHub("p", "c", clock=clock)
    coordinator = build_coordinator(settings.replace(checkin_limit=10), layout, hub)
    async with trio.open_nursery() as nursery:
        with hub.subscribe() as stream:
            await nursery.start(coordinator.run)
            first = await stream.get()  # round 1's SELECTION: published at once
            await coordinator.check_in("127.0.0.1:1")  # a count: held for the rest of 0.1 s
            second = await stream.get()
            nursery.cancel_scope.cancel()
    assert [(m["stage"], m["accepted"]) for m in (first, second)] == [
        ("SELECTION", 0), ("SELECTION", 1)
    ]  # fmt: skip
    gap = datetime.fromisoformat(second["time"]) - datetime.fromisoformat(first["time"])
    assert gap >= timedelta(seconds=0.1)


async def test_metrics_take_the_held_counts_along_in_one_message(
    settings: Settings, layout: Layout, mock_clock: trio.testing.MockClock
) -> None:
    """Metrics that arrive while a count snapshot is held back (for _COUNTS_EVERY) are
    published with those counts in one message, not after a message of the counts alone.
    The clock stands still, so the counts stay held until the metrics come: the initial
    model's (round 0), evaluated at start-up once the test opens the gate."""
    mock_clock.autojump_threshold = 30  # a hang ends in a failed assertion, not a stuck run
    gate = layout.model.parent / "gate"
    os.mkfifo(gate)
    held_open = os.open(gate, os.O_RDWR)
    remember(layout, 0, settings.keep_checkpoints)  # as serve does: the initial model's
    hub = StatusHub("p", "c")
    evaluating = settings.replace(checkin_limit=10, evaluate="helpers.evaluations:gated")
    coordinator = build_coordinator(evaluating, layout, hub)
    try:
        async with trio.open_nursery() as nursery:
            with hub.subscribe() as stream:
                await nursery.start(coordinator.run)
                first = await stream.get()  # round 1's SELECTION: published at once
                shown = trio.current_time()
                await coordinator.check_in("127.0.0.1:1")  # a count: held
                os.write(held_open, b"go")
                second = await stream.get()
                waited = trio.current_time() - shown  # the throttle's wait: none
                nursery.cancel_scope.cancel()
    finally:
        os.close(held_open)
    assert [(m["accepted"], m.get("metrics", {}).get("round")) for m in (first, second)] == [
        (0, None), (1, 0)
    ]  # fmt: skip
    assert (second["seq"] - first["seq"], waited) == (1, 0)


def _snapshot(stage: Stage = Stage.SELECTION, metrics: int = -1, accepted: int = 0) -> Status:
    """Round 1's status at ``stage`` with ``accepted`` check-ins, and the metrics of round
    ``metrics`` (-1: none)."""
    measured = RoundMetrics(metrics, (("accuracy", 0.5),)) if metrics >= 0 else None
    return Status(1, stage, accepted, 10, (), (), metrics=measured)


@pytest.mark.parametrize(
    ("held", "status", "published", "first"),
    [
        (_snapshot(accepted=1), _snapshot(accepted=2), _snapshot(), False),  # counts only
        (_snapshot(), _snapshot(Stage.CONFIGURATION), _snapshot(), True),  # a stage
        (_snapshot(accepted=1), _snapshot(metrics=0), _snapshot(), False),  # counts, metrics
        (_snapshot(metrics=1), _snapshot(metrics=2), _snapshot(), True),  # two metrics
        (_snapshot(metrics=1), _snapshot(metrics=2), _snapshot(metrics=1), False),  # shown
        (_snapshot(metrics=1), _snapshot(metrics=1, accepted=3), _snapshot(), False),
    ],
)
def test_a_held_snapshot_is_replaced_only_when_nothing_new_of_it_is_lost(
    held: Status, status: Status, published: Status, first: bool
) -> None:
    """Metrics of two evaluations handled in one step are both published (when the second
    replaced the first, round 1's metrics reached neither the stream nor the round log)."""
    assert _publish_first(held, status, _phase(published)) is first
