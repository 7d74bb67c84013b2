"""Fault injection: crashes, lost and silent selectors, bad files, malformed RPCs.

Whatever happens, the global checkpoint is the old one or the new one, whole,
and the coordinator keeps serving the next round.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
import signal
from pathlib import Path

import grpc
import h5py
import numpy as np
import purerpc
import pytest
import trio
from helpers.peers import (
    FakeSelector,
    GrpcioClient,
    PurerpcClient,
    completed,
    serve_and_watch,
    watch,
    write_aggregate,
)
from helpers.processes import READY

from fl_coordinator._proto import fl_intra_pb2, fl_round_grpc, fl_round_pb2
from fl_coordinator.app import build_coordinator, serve
from fl_coordinator.config import Settings
from fl_coordinator.federation.processes import Child
from fl_coordinator.status.hub import StatusHub
from fl_coordinator.storage.aggregation import Contribution, aggregate
from fl_coordinator.storage.journal import history, read_journal
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.untrusted import UntrustedFile


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the coordinator process killed during aggregation -----------------------------

BIG = (4096, 6144)  # 96 MiB of float32 per dataset: aggregation takes a while


def write_big(path: Path, value: float) -> None:
    with h5py.File(path, "w") as file:
        for index in range(3):
            file.create_dataset(f"layers/big{index}/vars/0", data=np.full(BIG, value, np.float32))
        file.create_dataset("layers/big0/vars/1", data=np.arange(10, dtype=np.float32) * value)


def coordinator_process(layout: Layout, tmp_path: Path, name: str) -> Child:
    env = {"FL_ROOT_PATH": str(layout.root), "HOST": "127.0.0.1", "PORT": "0",
           "STATUS_PORT": "0", "CHECKIN_LIMIT": "2", "LOG_LEVEL": "INFO"}  # fmt: skip
    return Child(name, ["fl_coordinator", "serve"], tmp_path / f"{name}.log", env)


async def test_kill_9_during_aggregation_leaves_old_or_new_checkpoint(
    layout: Layout, tmp_path: Path
) -> None:
    write_big(layout.checkpoint, 1.0)
    old = digest(layout.checkpoint)
    # What the new checkpoint would be, computed on copies: aggregation is deterministic.
    replay = tmp_path / "replay"
    replay.mkdir()
    shutil.copyfile(layout.checkpoint, replay / "fl_checkpoint")
    sources = []
    for index, value in enumerate((2.0, 4.0)):
        write_big(replay / f"agg{index}", value)
        sources.append(Contribution(f"s{index}", UntrustedFile(replay, f"agg{index}"), 3))
    aggregate(replay / "fl_checkpoint", sources, replay / "tmp")
    new = digest(replay / "fl_checkpoint")

    async with trio.open_nursery() as nursery:
        first = coordinator_process(layout, tmp_path, "first")
        ready = await first.start(nursery, READY)
        selectors = [await FakeSelector().start(nursery) for _ in range(2)]
        watcher = await watch(nursery, ready.group(2))
        client = PurerpcClient(int(ready.group(1)))
        for selector in selectors:
            assert await client.check_in(selector.id) is True

        for selector, source in zip(selectors, sources, strict=True):
            await selector.told.receive()
            layout.selector_dir(selector.id).mkdir()
            shutil.copyfile(source.checkpoint.path, layout.agg_checkpoint(selector.id))
            layout.agg_weight(selector.id).write_text(f"{source.weight}\n")
            await client.report(selector.id)
        await watcher.wait_for(lambda m: m["aggregating"])
        first.process.send_signal(signal.SIGKILL)
        assert await first.wait() == -signal.SIGKILL
        nursery.cancel_scope.cancel()

    after = digest(layout.checkpoint)
    assert after in (old, new)
    assert list(layout.tmp.iterdir()) == [] or all(p.suffix == ".tmp" for p in layout.tmp.iterdir())

    async with trio.open_nursery() as nursery:
        second = coordinator_process(layout, tmp_path, "second")
        ready = await second.start(nursery, READY)
        watcher = await watch(nursery, ready.group(2))
        opened = await watcher.wait_for(lambda m: True)
        assert (opened["round"], opened["stage"]) == (2, "SELECTION")
        await second.stop()
        nursery.cancel_scope.cancel()
    assert list(layout.tmp.iterdir()) == []  # leftovers of the killed one were cleaned up
    assert digest(layout.checkpoint) == after
    if after == new:
        assert digest(history(layout)[1]) == new
    else:
        assert 1 not in history(layout)
    assert read_journal(layout).round == 2


# -- selectors that fail ------------------------------------------------------------


class SilentSelector(FakeSelector):
    """Accepts the GoalCountReached call and never answers."""

    async def GoalCountReached(self, message: fl_intra_pb2.Empty) -> fl_intra_pb2.Empty:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_silent_selector_is_dropped_and_the_round_goes_on(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery
) -> None:
    _, watcher, client = await serve_and_watch(
        nursery, settings.replace(goal_count_timeout=0.5, goal_count_retries=1, checkin_limit=3)
    )
    alive = await FakeSelector().start(nursery)
    silent = await SilentSelector().start(nursery)
    for selector in (alive, silent, alive):
        assert await client.check_in(selector.id) is True
    await alive.told.receive()
    write_aggregate(layout, alive.id, keras_weights[0], weight=2)
    await client.report(alive.id)
    done = await watcher.wait_for(completed(1))
    assert done["stage"] == "COMPLETED"
    assert (done["unreachable"], done["selectors"], done["accepted"]) == (
        [silent.id],
        [alive.id],
        2,
    )


async def test_selector_lost_after_configuration_reporting_window(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery
) -> None:
    rules = {"reporting_timeout": 1.0, "checkin_limit": 3}
    _, watcher, client = await serve_and_watch(
        nursery, settings.replace(**rules, min_reporting_fraction=0.5)
    )
    stays, lost = await FakeSelector().start(nursery), await FakeSelector().start(nursery)
    for selector in (stays, stays, lost):
        assert await client.check_in(selector.id) is True
    await stays.told.receive()
    write_aggregate(layout, stays.id, keras_weights[0], weight=2)
    await client.report(stays.id)  # `lost` never reports: its process died after being told
    done = await watcher.wait_for(completed(1))
    assert (done["stage"], done["reported"]) == ("COMPLETED", [stays.id])

    # Round 2: the one that stays holds too few clients; the round is abandoned.
    before = digest(layout.checkpoint)
    for selector in (stays, lost, lost):
        assert await client.check_in(selector.id) is True
    await stays.told.receive()
    await client.report(stays.id)
    failed = await watcher.wait_for(completed(2))
    assert failed["stage"] == "FAILED"
    assert "reporting window of 1 s closed but only 1 of 3 client(s)" in failed["error"]
    assert digest(layout.checkpoint) == before
    assert (await watcher.wait_for(lambda m: m["round"] == 3))["stage"] == "SELECTION"


# -- bad files, one test each ---------------------------------------------------------


def damage_h5(change):
    def apply(layout: Layout, selector: str, source: Path) -> None:
        with (
            h5py.File(source, "r") as original,
            h5py.File(layout.agg_checkpoint(selector), "w") as out,
        ):
            arrays = {}
            original.visititems(
                lambda n, o: arrays.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None
            )
            change(arrays)
            for name, array in arrays.items():
                out.create_dataset(name, data=array)

    return apply


def bytes_of(data: bytes, weight: bool = False):
    def apply(layout: Layout, selector: str, source: Path) -> None:
        target = layout.agg_weight(selector) if weight else layout.agg_checkpoint(selector)
        target.write_bytes(data)

    return apply


BAD_FILES = {
    "aggregate missing": (lambda layout, s, _: layout.agg_checkpoint(s).unlink(), "is missing"),
    "aggregate truncated": (
        lambda layout, s, source: layout.agg_checkpoint(s).write_bytes(source.read_bytes()[:4096]),
        "not a readable HDF5",
    ),
    "aggregate not HDF5": (bytes_of(b"PK\x03\x04 a zip file, not HDF5" * 50), "not a readable HDF5"),
    "dataset missing": (damage_h5(lambda a: a.pop("layers/dense/vars/1")), "is missing"),
    "other shape": (damage_h5(lambda a: a.update({"layers/dense/vars/1": np.zeros(3, np.float32)})),
                    "has shape (3,), expected (32,)"),
    "other dtype": (damage_h5(lambda a: a.update({"layers/dense/vars/1": np.zeros(32, np.float16)})),
                    "has dtype float16, expected float32"),
    "NaN": (damage_h5(lambda a: a["layers/dense/vars/0"].__setitem__((3, 3), np.nan)), "NaN or Inf"),
    "Inf": (damage_h5(lambda a: a["layers/dense/vars/1"].__setitem__(0, -np.inf)), "NaN or Inf"),
    "weight missing": (lambda layout, s, _: layout.agg_weight(s).unlink(), "weight file is missing"),
    "weight empty": (bytes_of(b"", weight=True), "weight file is empty"),
    "weight not a number": (bytes_of(b"twelve\n", weight=True), "is not a decimal integer"),
    "weight zero": (bytes_of(b"0\n", weight=True), "it must be at least 1"),
    "weight negative": (bytes_of(b"-5\n", weight=True), "is not a decimal integer"),
    "weight absurd": (bytes_of(b"9" * 30, weight=True), "absurdly large"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FILES))
async def test_bad_file_is_rejected_with_a_specific_reason(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery, case: str
) -> None:
    _, watcher, client = await serve_and_watch(
        nursery, settings.replace(min_reporting_fraction=1.0)
    )
    selector = await FakeSelector().start(nursery)
    before = digest(layout.checkpoint)
    assert [await client.check_in(selector.id) for _ in range(2)] == [True, True]
    await selector.told.receive()
    write_aggregate(layout, selector.id, keras_weights[0], weight=4)
    damage, reason = BAD_FILES[case]
    damage(layout, selector.id, keras_weights[0])
    await client.report(selector.id)
    failed = await watcher.wait_for(completed(1))
    assert failed["stage"] == "FAILED"
    assert reason in failed["rejected"][selector.id]
    assert str(layout.selector_dir(selector.id)) in failed["rejected"][selector.id]
    assert digest(layout.checkpoint) == before


async def test_malformed_protobuf_is_refused_and_changes_nothing(
    settings: Settings, nursery: trio.Nursery
) -> None:
    endpoints = await nursery.start(serve, settings)
    selector = await FakeSelector().start(nursery)
    watcher = await watch(nursery, endpoints.status_url)
    channel = grpc.insecure_channel(f"127.0.0.1:{endpoints.grpc_port}")
    raw = channel.unary_unary(
        "/FlIntra/ClientCountUpdate", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError):
        await trio.to_thread.run_sync(lambda: raw(b"\x0a\xff\xff\xff\xff\x0f garbage", timeout=10))
    client = GrpcioClient(endpoints.grpc_port)
    assert await client.check_in(selector.id) is True  # still serving; nothing was counted
    assert (await watcher.wait_for(lambda m: m["accepted"] == 1))["selectors"] == [selector.id]
    client.close()
    channel.close()


# -- windows on a virtual clock -------------------------------------------------------


async def test_selection_window_on_a_mock_clock(
    settings: Settings, layout: Layout, autojump_clock
) -> None:
    """30 s selection window, 3 of 4 clients: no real waiting (trio's autojump clock)."""
    settings = settings.replace(checkin_limit=4, selection_timeout=30.0, min_checkin_fraction=0.75,
                                goal_count_retries=0)  # fmt: skip
    hub = StatusHub("p", "c")
    coordinator = build_coordinator(settings, layout, hub)
    async with trio.open_nursery() as nursery:
        with hub.subscribe() as stream:
            await nursery.start(coordinator.run)
            started = trio.current_time()
            for _ in range(3):
                nursery.start_soon(coordinator.check_in, "127.0.0.1:1")  # nobody listens there
            while (message := await stream.get())["stage"] != "CONFIGURATION":
                pass
            assert message["accepted"] == 3
            assert 30.0 <= trio.current_time() - started < 31.0
            while (message := await stream.get())["stage"] != "FAILED":
                pass
            assert message["error"] == "no selector of the round could be told to configure"
            assert (await stream.get())["round"] == 2
        nursery.cancel_scope.cancel()


async def test_selector_process_killed_after_check_in(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A real fl-selector process holds a client, then dies (SIGKILL) before being told."""
    endpoints = await nursery.start(serve, settings.replace(checkin_limit=3, goal_count_retries=0))
    watcher = await watch(nursery, endpoints.status_url)
    doomed = Child(
        "selector",
        ["fl_coordinator.federation.selector_cli", "serve", "--root", str(layout.root),
         "--coordinator", f"127.0.0.1:{endpoints.grpc_port}", "--port", "0"],
        tmp_path / "selector.log",
    )  # fmt: skip
    doomed_id = (await doomed.start(nursery, r"selector (\S+) serving")).group(1)

    async def held_client() -> None:  # checks in at the real selector; dies with it
        host, port = doomed_id.rsplit(":", 1)
        with contextlib.suppress(Exception):
            async with purerpc.insecure_channel(host, int(port)) as channel:
                stream = await fl_round_grpc.FlRoundStub(channel).CheckIn()
                await stream.send_message(fl_round_pb2.CheckInRequest(message="hold me"))
                while await stream.receive_message() is not None:
                    pass

    nursery.start_soon(held_client)
    await watcher.wait_for(lambda m: m["selectors"] == [doomed_id])  # accepted via the selector
    doomed.process.send_signal(signal.SIGKILL)
    await doomed.wait()

    survivor = await FakeSelector().start(nursery)
    client = PurerpcClient(endpoints.grpc_port)
    assert [await client.check_in(survivor.id) for _ in range(2)] == [True, True]
    await survivor.told.receive()
    write_aggregate(layout, survivor.id, keras_weights[0], weight=5)
    await client.report(survivor.id)
    done = await watcher.wait_for(completed(1))
    assert done["stage"] == "COMPLETED"
    assert (done["unreachable"], done["selectors"], done["accepted"]) == (
        [doomed_id], [survivor.id], 2,
    )  # fmt: skip
    assert (await watcher.wait_for(lambda m: m["round"] == 2))["stage"] == "SELECTION"


async def test_same_selector_reporting_twice_counts_once(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery
) -> None:
    _, watcher, client = await serve_and_watch(nursery, settings.replace(checkin_limit=3))
    twice, other = await FakeSelector().start(nursery), await FakeSelector().start(nursery)
    for selector in (twice, other, other):
        assert await client.check_in(selector.id) is True
    await twice.told.receive()
    write_aggregate(layout, twice.id, keras_weights[0], weight=2)
    await client.report(twice.id)
    await client.report(twice.id)  # again: must not stand in for `other`
    shown = await watcher.wait_for(lambda m: [twice.id, "it already reported"] in m["ignored"])
    assert (shown["stage"], shown["aggregating"]) == ("REPORTING", False)
    checked = await watcher.wait_for(lambda m: m["reported"] == [twice.id])
    assert checked["aggregating"] is False  # the repeat did not stand in for `other`

    write_aggregate(layout, other.id, keras_weights[1], weight=4)
    await client.report(other.id)
    done = await watcher.wait_for(completed(1))
    assert done["stage"] == "COMPLETED" and sorted(done["reported"]) == sorted([twice.id, other.id])


async def run_idle(
    settings: Settings, layout: Layout, seconds: float, clients: int = 0
) -> tuple[set[tuple[int, str]], list[str], list[logging.LogRecord]]:
    """A coordinator left ``seconds`` of virtual time after ``clients`` check-ins: the
    (round, stage) pairs it published, its progress lines, and every log record."""
    hub = StatusHub("p", "c")
    coordinator = build_coordinator(settings, layout, hub)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("fl_coordinator")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        with hub.subscribe() as stream:
            async with trio.open_nursery() as nursery:
                await nursery.start(coordinator.run)
                for _ in range(clients):
                    await coordinator.check_in("127.0.0.1:1")
                await trio.sleep(seconds)
                seen = stream.take_ready()
                nursery.cancel_scope.cancel()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    stages = {(p.message["round"], p.message["stage"]) for p in seen}
    progress = [r.getMessage() for r in records if "waiting for clients" in r.getMessage()]
    return stages, progress, records


async def test_empty_selection_windows_are_not_failures(
    settings: Settings, layout: Layout, autojump_clock
) -> None:
    """Issue 13: an idle coordinator with SELECTION_TIMEOUT keeps its round, without errors."""
    settings = settings.replace(checkin_limit=6, selection_timeout=30.0)
    stages, progress, records = await run_idle(settings, layout, seconds=600)  # twenty windows
    assert stages == {(1, "SELECTION")}
    assert progress == [
        f"round 1: waiting for clients: 0/6 accepted for {s} s (SELECTION_TIMEOUT=30 s windows)"
        for s in (60, 180, 420)
    ]
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []


async def test_a_long_selection_is_said_at_a_calm_interval(
    settings: Settings, layout: Layout, autojump_clock
) -> None:
    """Issue 13: CHECKIN_LIMIT larger than the clients that come is not five silent minutes."""
    settings = settings.replace(checkin_limit=6, selection_timeout=0.0)
    stages, progress, _ = await run_idle(settings, layout, seconds=3700, clients=3)
    assert stages == {(1, "SELECTION")}
    waited = [int(re.search(r"accepted for (\d+) s", line).group(1)) for line in progress]
    assert waited == [60, 180, 420, 900, 1860, 3660]  # after 60 s, then doubling, up to 30 min
    assert progress[0] == (
        "round 1: waiting for clients: 3/6 accepted for 60 s (SELECTION_TIMEOUT=0: no time limit)"
    )
