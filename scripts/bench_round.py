"""Round-overhead part of scripts/bench: complete rounds per second, the protocol's own cost.

A coordinator (``serve()``) with a tiny checkpoint and 10 fake selectors, all
in this process on one trio loop. Every round: each selector checks in one
client (goal = 10), the coordinator tells all ten (``GoalCountReached``, a
fresh connection each, as the Go system dials), each reports a tiny
aggregate written once up front, the coordinator checks the ten files and
averages them into a new checkpoint (fsynced, renamed, journaled, kept in the
history).

The reference, measured in the same run: the same 30 RPCs per round with
the same concurrency (10 check-ins, 10 broadcasts, 10 reports) against
purerpc servers that answer at once and touch no file. What is left of a
round beyond that is the coordinator's own cost (round task, file checks,
aggregation, journal).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

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
from fl_coordinator.storage.layout import Layout

SELECTORS = 10
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


async def _rounds(root: Path, rounds: int, reference: bool) -> float:
    """Seconds for ``rounds`` rounds, against our coordinator or the reference servers."""
    settings = default_settings().replace(
        fl_root_path=str(root), host="127.0.0.1", port=0, status_port=0,
        checkin_limit=SELECTORS, keep_checkpoints=2,
    )  # fmt: skip
    layout = tiny_problem(settings)
    told_in, told = trio.open_memory_channel[str](SELECTORS)
    done_in, done = trio.open_memory_channel[int](rounds + 1)
    async with trio.open_nursery() as nursery:
        if reference:
            port = await nursery.start(serve_grpc, [ConstantIntra().service], "127.0.0.1", 0)
        else:
            endpoints = await nursery.start(serve, settings)
            port = endpoints.grpc_port
            nursery.start_soon(_completions, endpoints.status_url, done_in)
        selectors = []
        for _ in range(SELECTORS):
            selector = FakeSelector(told_in)
            selector_port = await nursery.start(serve_grpc, [selector.service], "127.0.0.1", 0)
            selector.id = f"127.0.0.1:{selector_port}"
            write_aggregate(layout, selector.id)
            selectors.append(selector)
        async with purerpc.insecure_channel("127.0.0.1", port) as channel:
            stub = fl_intra_grpc.FlIntraStub(channel)
            started = time.perf_counter()
            for _ in range(rounds):
                await _one_round(stub, selectors, told, reference)
                if not reference:
                    await done.receive()
            seconds = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return seconds


async def _one_round(
    stub: Any, selectors: list[FakeSelector], told: trio.MemoryReceiveChannel, reference: bool
) -> None:
    async with trio.open_nursery() as calls:
        for selector in selectors:
            calls.start_soon(stub.ClientCountUpdate, fl_intra_pb2.ClientCount(id=selector.id))
    if reference:  # our coordinator tells the selectors itself; the reference has the bench do it
        tell = GoalCountClient(call_timeout=10.0)
        async with trio.open_nursery() as calls:
            for selector in selectors:
                calls.start_soon(tell, selector.id)
    async with trio.open_nursery() as calls:
        for _ in selectors:
            request = fl_intra_pb2.SelectorId(id=await told.receive())
            calls.start_soon(stub.SelectorAggregationComplete, request)


def bench_round(rounds: int) -> dict[str, Any]:
    results = {}
    for mode in ("reference", "ours"):
        with tempfile.TemporaryDirectory(prefix="fl-bench-round-") as name:
            seconds = trio.run(_rounds, Path(name), rounds, mode == "reference")
        results[f"{mode}_rounds_per_s"] = rounds / seconds
    results["rounds"] = rounds
    results["selectors"] = SELECTORS
    results["ratio_to_reference"] = results["ours_rounds_per_s"] / results["reference_rounds_per_s"]
    print(f"{'selectors':>9} {'rounds':>6} {'reference rounds/s':>18} {'ours rounds/s':>13} "
          f"{'ours/reference':>14}")  # fmt: skip
    print(f"{SELECTORS:>9} {rounds:>6} {results['reference_rounds_per_s']:>18.1f} "
          f"{results['ours_rounds_per_s']:>13.1f} "
          f"{results['ratio_to_reference']:>14.2f}")  # fmt: skip

    return results
