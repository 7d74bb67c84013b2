"""The reference selector keeps one connection to the coordinator, and dials again when it is gone.

The Go selector dials the coordinator for every client and never closes the
connection. The coordinator here is a real gRPC server (our listener) that
refuses every client and records the connection (its peer address, from the
log context) each call came on; clients are real purerpc clients of the selector.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers.peers import eventually, refused_wait_ms

from fl_coordinator._proto import (
    fl_intra_batch_grpc,
    fl_intra_batch_pb2,
    fl_intra_grpc,
    fl_intra_pb2,
    fl_round_grpc,
    fl_round_pb2,
)
from fl_coordinator.connections import ConnectionLimits
from fl_coordinator.federation.client import SelectorCalls
from fl_coordinator.federation.link import IDLE_CLOSE
from fl_coordinator.federation.selector import Selector, SelectorOptions
from fl_coordinator.federation.transfer import file_chunks
from fl_coordinator.logs import context_field
from fl_coordinator.rpc.listener import serve_grpc
from fl_coordinator.storage.layout import Layout

WAIT_MS = 750


class RecordingCoordinator(fl_intra_grpc.FlIntraServicer, fl_intra_batch_grpc.FlIntraBatchServicer):
    """Refuses every client; ``connections`` lists the peer address of each call about
    clients (not the selector's start-up call, a batch of none)."""

    def __init__(self) -> None:
        self.connections: list[str] = []

    async def ClientCountUpdate(
        self, message: fl_intra_pb2.ClientCount
    ) -> fl_intra_pb2.FlClientStatus:
        self.connections.append(context_field("peer"))
        return fl_intra_pb2.FlClientStatus(accepted=False)

    async def CheckInClients(
        self, message: fl_intra_batch_pb2.ClientBatch
    ) -> fl_intra_batch_pb2.ClientsAccepted:
        if message.clients:
            self.connections.append(context_field("peer"))
        return fl_intra_batch_pb2.ClientsAccepted(accepted=0)

    async def serve(
        self,
        port: int = 0,
        limits: ConnectionLimits | None = None,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        services = [
            fl_intra_grpc.FlIntraServicer.service.fget(self),  # type: ignore[attr-defined]
            fl_intra_batch_grpc.FlIntraBatchServicer.service.fget(self),  # type: ignore[attr-defined]
        ]
        await serve_grpc(services, "127.0.0.1", port, limits=limits, task_status=task_status)


async def start_selector(nursery: trio.Nursery, layout: Layout, port: int, batch: bool) -> Selector:
    options = SelectorOptions(
        coordinator=f"127.0.0.1:{port}", layout=layout, waiting_time_ms=WAIT_MS, batch_checkin=batch
    )
    selector = Selector(options)
    await nursery.start(selector.serve)
    return selector


@pytest.mark.parametrize("batch", [True, False], ids=["CheckInClients", "ClientCountUpdate"])
async def test_every_call_goes_over_one_connection(
    layout: Layout, nursery: trio.Nursery, batch: bool
) -> None:
    coordinator = RecordingCoordinator()
    port = await nursery.start(coordinator.serve)
    selector = await start_selector(nursery, layout, port, batch)
    for _ in range(10):
        assert await refused_wait_ms(selector.id) == WAIT_MS
    assert len(coordinator.connections) == 10
    assert len(set(coordinator.connections)) == 1  # one source address: one connection
    assert selector._link is not None and selector._link.dials == 1


async def test_a_restarted_coordinator_is_dialled_again(
    layout: Layout, nursery: trio.Nursery
) -> None:
    first = RecordingCoordinator()
    async with trio.open_nursery() as first_running:
        port = await first_running.start(first.serve)
        selector = await start_selector(nursery, layout, port, batch=False)
        assert await refused_wait_ms(selector.id) == WAIT_MS
        first_running.cancel_scope.cancel()  # the coordinator stops: its connections close
    second = RecordingCoordinator()
    await nursery.start(second.serve, port)
    # The call in flight when the connection is found dead fails at once (no 60 s
    # call time limit): the client is refused, and the next call dials the new one.
    with trio.fail_after(20):
        for _ in range(2):
            assert await refused_wait_ms(selector.id) == WAIT_MS
    assert (len(first.connections), len(second.connections) >= 1) == (1, True)
    assert selector._link is not None and selector._link.dials == 2


async def test_a_connection_the_coordinator_closed_when_idle_is_dialled_again(
    layout: Layout, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """On trio's MockClock at the real clock's rate, made to jump past the coordinator's
    idle time (half the link's own): on the real clock, a busy machine could idle out
    the second connection too before its call arrived (it failed so, once)."""
    mock_clock.rate = 1.0
    idle = IDLE_CLOSE / 2
    coordinator = RecordingCoordinator()
    port = await nursery.start(coordinator.serve, 0, ConnectionLimits(idle_timeout=idle))
    selector = await start_selector(nursery, layout, port, batch=True)
    link = selector._link
    assert link is not None
    assert await refused_wait_ms(selector.id) == WAIT_MS
    mock_clock.jump(idle)
    # The coordinator's GOAWAY and close arrived, well before the link's own idle close.
    await eventually(lambda: not link.connected, limit=idle / 2)
    assert await refused_wait_ms(selector.id) == WAIT_MS
    assert link.dials == 2 and len(coordinator.connections) == 2
    assert len(set(coordinator.connections)) == 2  # a new connection


async def test_a_call_as_the_idle_close_runs_out_dials_again(
    layout: Layout, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """A refused client waits the selector's reconnection time (20 s by default), exactly
    IDLE_CLOSE: its next check-in must not take the connection being closed at that moment
    (it failed as lost, and was explained as a peer that does not speak HTTP/2)."""
    coordinator = RecordingCoordinator()
    port = await nursery.start(coordinator.serve, 0, ConnectionLimits(idle_timeout=None))
    selector = await start_selector(nursery, layout, port, batch=False)
    link = selector._link
    assert link is not None
    assert await refused_wait_ms(selector.id) == WAIT_MS
    assert link.connected
    mock_clock.jump(IDLE_CLOSE)
    # Not a checkpoint since: the link's own closing of the connection (purerpc's
    # socket shut down, the stream closed) has not even begun, and takes I/O.
    assert not link.connected  # the next call will not be handed the dying connection
    assert await refused_wait_ms(selector.id) == WAIT_MS
    assert link.dials == 2 and len(coordinator.connections) == 2


class FilesSelector(fl_round_grpc.FlRoundServicer):
    """Answers a CheckIn with the files of ``folder`` (``model.h5``, ``fl_checkpoint``) in
    the selector's 64 KiB chunks."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def CheckIn(
        self, messages: AsyncIterator[fl_round_pb2.CheckInRequest]
    ) -> AsyncIterator[fl_round_pb2.FlData]:
        async for _ in messages:
            break
        for name in ("model.h5", "fl_checkpoint"):
            async for chunk in file_chunks(self.folder / name):
                yield chunk


async def test_the_client_downloads_files_larger_than_a_chunk(tmp_path: Path) -> None:
    """A 200 KB model.h5 (four chunks of 64 KiB and a part). Before: the client's connection
    window stayed at HTTP/2's 65,535 bytes, smaller than one chunk's message, which purerpc
    gives back only whole: nothing came (the check-in waited until its limit)."""
    sent = tmp_path / "sent"
    sent.mkdir()
    (sent / "model.h5").write_bytes(random.Random(1).randbytes(200_000))
    (sent / "fl_checkpoint").write_bytes(b"weights")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_grpc, [FilesSelector(sent).service], "127.0.0.1", 0)
        calls = SelectorCalls(f"127.0.0.1:{port}", tmp_path / "received")
        calls.connect(nursery)
        with trio.fail_after(30):
            assert await calls.check_in() is None
        nursery.cancel_scope.cancel()
    for name in ("model.h5", "fl_checkpoint"):
        assert (tmp_path / "received" / name).read_bytes() == (sent / name).read_bytes()
