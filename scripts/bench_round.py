"""Round-overhead part of scripts/bench: complete rounds per second, the protocol's own cost.

A coordinator (``serve()``) with a tiny checkpoint and N fake selectors (10,
100, 500: ``--selectors``), all in this process on one trio loop. Every
round: each selector checks in one client (goal = N), the coordinator tells
all N (``GoalCountReached``, over the connection it keeps per selector),
each reports a tiny aggregate written once up front, the coordinator checks
the N files and averages them into a new checkpoint (fsynced, renamed,
journaled, kept in the history).

The reference, measured in the same run: the same 3N RPCs per round with the
same concurrency (N check-ins and N reports, 64 at a time on one connection:
the gRPC port allows 100 streams per connection; N broadcasts over kept
connections) against purerpc servers that answer at once and touch no file.
One round of each, the first, is not timed: it opens the connections to the
selectors and to the coordinator that the next rounds reuse (at 100 selectors
the reference's first round took 1.7 times as long as the next ones).
What is left of a round beyond that is the coordinator's own cost (round
task, file checks, aggregation, journal). Runs are paired (reference, then
ours) and repeated; the ratio is given as min/median/max over the pairs.

What-if (``--round-without checks averaging journal``): ours again with some
of its storage duties stubbed in this process (see :func:`stubbed`), to show
what each costs a round. Those rows are not what the coordinator does.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import h5py
import numpy as np
import purerpc
import trio
import trio_websocket

from fl_coordinator._proto import fl_intra_grpc, fl_intra_pb2
from fl_coordinator.app import serve
from fl_coordinator.config import Settings, default_settings
from fl_coordinator.rpc.goal_count import GoalCountClient
from fl_coordinator.rpc.listener import serve_grpc
from fl_coordinator.storage.aggregation import AggregationResult, Aggregator, aggregate
from fl_coordinator.storage.checker import ContributionChecker
from fl_coordinator.storage.journal_writer import JournalWriter
from fl_coordinator.storage.layout import Layout

DATASET = "layers/dense/vars/0"


def tiny_problem(settings: Settings) -> Layout:
    """A problem folder with a 64-float checkpoint (no Keras: this is about the protocol)."""
    layout = Layout.from_settings(settings)
    layout.init_files.mkdir(parents=True, exist_ok=True)
    for path in (layout.checkpoint, layout.model):
        with h5py.File(path, "w") as file:
            file[DATASET] = np.zeros((8, 8), np.float32)
    return layout


def write_aggregate(layout: Layout, selector: str) -> None:
    layout.selector_dir(selector).mkdir(parents=True, exist_ok=True)
    with h5py.File(layout.agg_checkpoint(selector), "w") as file:
        file[DATASET] = np.ones((8, 8), np.float32)
    layout.agg_weight(selector).write_text("1\n")


class FakeSelector(fl_intra_grpc.FLGoalCountBroadcastServicer):
    """Answers GoalCountReached; the bench then reports for it (its aggregate is written once)."""

    def __init__(self, told: trio.MemorySendChannel) -> None:
        self.told = told
        self.id = ""

    async def GoalCountReached(self, message: fl_intra_pb2.Empty) -> fl_intra_pb2.Empty:
        self.told.send_nowait(self.id)
        return fl_intra_pb2.Empty()


class ConstantIntra(fl_intra_grpc.FlIntraServicer):
    """The reference coordinator: answers at once, no round behind it."""

    async def ClientCountUpdate(self, message: Any) -> Any:
        return fl_intra_pb2.FlClientStatus(accepted=True)

    async def SelectorAggregationComplete(self, message: Any) -> Any:
        return fl_intra_pb2.Empty()


async def _completions(url: str, done: trio.MemorySendChannel) -> None:
    """Follow the status stream as the webserver does; send each completed round number."""
    async with trio_websocket.open_websocket_url(url) as ws:
        while True:
            status = json.loads(await ws.get_message())
            if status["stage"] == "COMPLETED":
                done.send_nowait(status["round"])


async def _rounds(
    root: Path, rounds: int, selectors: int, reference: bool, aggregator: Aggregator = aggregate
) -> float:
    """Seconds for ``rounds`` rounds, against our coordinator (averaging with
    ``aggregator``) or the reference servers."""
    settings = default_settings().replace(
        fl_root_path=str(root), host="127.0.0.1", port=0, status_port=0,
        checkin_limit=selectors, keep_checkpoints=2,
    )  # fmt: skip
    layout = tiny_problem(settings)
    told_in, told = trio.open_memory_channel[str](selectors)
    done_in, done = trio.open_memory_channel[int](rounds + 2)
    tell = GoalCountClient(call_timeout=10.0)  # the reference's broadcasts
    async with trio.open_nursery() as nursery:
        if reference:
            port = await nursery.start(serve_grpc, [ConstantIntra().service], "127.0.0.1", 0)
            await nursery.start(tell.run)
        else:
            endpoints = await nursery.start(
                functools.partial(serve, aggregator=aggregator), settings
            )
            port = endpoints.grpc_port
            nursery.start_soon(_completions, endpoints.status_url, done_in)
        fakes = []
        for _ in range(selectors):
            selector = FakeSelector(told_in)
            selector_port = await nursery.start(serve_grpc, [selector.service], "127.0.0.1", 0)
            selector.id = f"127.0.0.1:{selector_port}"
            write_aggregate(layout, selector.id)
            fakes.append(selector)
        async with purerpc.insecure_channel("127.0.0.1", port) as channel:
            stub = fl_intra_grpc.FlIntraStub(channel)
            started = 0.0
            for index in range(rounds + 1):
                if index == 1:  # round 1 (untimed) dials every connection the others reuse
                    started = time.perf_counter()
                await _one_round(stub, fakes, told, tell if reference else None)
                if not reference:
                    await done.receive()
            seconds = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return seconds


@dataclass
class Stubs:
    """What :func:`stubbed` gives ours: the averaging function to serve with, and how
    often each stub stood in for its duty (a stub never reached would show 0)."""

    aggregator: Aggregator = aggregate
    calls: collections.Counter[str] = field(default_factory=collections.Counter)


@contextlib.contextmanager
def stubbed(duties: Collection[str]) -> Iterator[Stubs]:
    """Inside, each of ``duties`` (of :data:`bench_report.DUTIES`) costs (almost) nothing:

    * checks: each selector's files are checked once, by the real checker (in
      its worker processes: settling, retries and all), and that outcome is
      reused: later rounds start no check job;
    * averaging: the pass that reads the inputs and writes the new checkpoint
      is one that writes nothing (``serve``'s ``aggregator``); what comes
      around it (the write-ahead journal entry awaited, the history kept) stays;
    * journal: entries are dropped: nothing is written, nothing waits for one.
    """
    stubs = Stubs()
    found: dict[str, Any] = {}
    checked_once = ContributionChecker.check

    async def check(self: ContributionChecker, selector: str) -> Any:
        stubs.calls["checks"] += 1
        if selector not in found:
            found[selector] = await checked_once(self, selector)
        return found[selector]

    def average(checkpoint: Path, contributions: Sequence[Any], *_: Any) -> AggregationResult:
        stubs.calls["averaging"] += 1
        weight = sum(contribution.weight for contribution in contributions)
        return AggregationResult(arrays=0, bytes_read=0, total_weight=weight, seconds=0.0)

    def submit(self: JournalWriter, entry: Any) -> None:
        stubs.calls["journal"] += 1

    with contextlib.ExitStack() as stack:
        if "checks" in duties:
            stack.enter_context(mock.patch.object(ContributionChecker, "check", check))
        if "averaging" in duties:
            stubs.aggregator = average
        if "journal" in duties:
            stack.enter_context(mock.patch.object(JournalWriter, "submit", submit))
        yield stubs


#: Calls in flight at once on the bench's one connection: the coordinator's gRPC
#: port allows 100 concurrent streams per connection (rpc/connection.py).
_CALLS_IN_FLIGHT = 64


async def _one_round(
    stub: Any,
    selectors: list[FakeSelector],
    told: trio.MemoryReceiveChannel,
    tell: GoalCountClient | None,
) -> None:
    limit = trio.CapacityLimiter(_CALLS_IN_FLIGHT)

    async def call(method: Any, request: Any) -> None:
        async with limit:
            await method(request)

    async with trio.open_nursery() as calls:
        for selector in selectors:
            request = fl_intra_pb2.ClientCount(id=selector.id)
            calls.start_soon(call, stub.ClientCountUpdate, request)
    if (
        tell is not None
    ):  # our coordinator tells the selectors itself; the reference has the bench do it
        async with trio.open_nursery() as calls:
            for selector in selectors:
                calls.start_soon(tell, selector.id)
    async with trio.open_nursery() as calls:
        for _ in selectors:
            request = fl_intra_pb2.SelectorId(id=await told.receive())
            calls.start_soon(call, stub.SelectorAggregationComplete, request)


def _rounds_per_s(
    rounds: int, selectors: int, reference: bool, aggregator: Aggregator = aggregate
) -> float:
    with tempfile.TemporaryDirectory(prefix="fl-bench-round-") as name:
        return rounds / trio.run(_rounds, Path(name), rounds, selectors, reference, aggregator)


def _ours_per_s(
    rounds: int, selectors: int, without: Collection[str]
) -> tuple[float, dict[str, int]]:
    """Our rounds/s, with ``without`` stubbed, and how often each stub stood in."""
    with stubbed(without) as stubs:
        return _rounds_per_s(rounds, selectors, False, stubs.aggregator), dict(stubs.calls)


def bench_round(
    rounds: int, selector_counts: list[int], repeat: int, without: Collection[str] = ()
) -> list[dict[str, Any]]:
    """One row per number of selectors: rounds/s of each (median of ``repeat`` pairs), and
    the ratio ours/reference of each pair as min/median/max.

    ``rounds`` is the number of rounds timed with 10 selectors; with N it is
    ``rounds * 10 / N`` (at least 3), the same number of RPCs. ``without``: our
    duties stubbed (:func:`stubbed`); each row names them, with how often each
    stub stood in (``stubbed_calls``, over all its runs).
    """
    print(f"{'selectors':>9} {'rounds':>6} {'reference rounds/s':>18} {'ours rounds/s':>13} "
          f"{'ours/reference min/median/max':>29} {'ours ms/selector':>16}")  # fmt: skip
    rows = []
    for selectors in selector_counts:
        timed = max(3, rounds * 10 // selectors)
        pairs, stubs = [], collections.Counter[str]()
        for _ in range(repeat):
            reference = _rounds_per_s(timed, selectors, True)
            ours, calls = _ours_per_s(timed, selectors, without)
            pairs.append((reference, ours))
            stubs.update(calls)
        ratios = sorted(ours / reference for reference, ours in pairs)
        row = {
            "selectors": selectors,
            "rounds": timed,
            "pairs": len(pairs),
            "reference_rounds_per_s": statistics.median(r for r, _ in pairs),
            "ours_rounds_per_s": statistics.median(o for _, o in pairs),
            "ratio_min": ratios[0],
            "ratio_to_reference": statistics.median(ratios),
            "ratio_max": ratios[-1],
            "without": list(without),
            "stubbed_calls": dict(stubs),
        }
        # What a round costs beyond the reference's, per selector (ms).
        extra = 1 / row["ours_rounds_per_s"] - 1 / row["reference_rounds_per_s"]
        row["extra_ms_per_selector"] = 1000 * extra / selectors
        rows.append(row)
        print(f"{selectors:>9} {timed:>6} {row['reference_rounds_per_s']:>18.1f} "
              f"{row['ours_rounds_per_s']:>13.1f} "
              f"{ratios[0]:>13.2f}/{row['ratio_to_reference']:.2f}/{ratios[-1]:.2f} "
              f"{row['extra_ms_per_selector']:>16.2f}")  # fmt: skip
    return rows
