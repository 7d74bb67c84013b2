"""The health service's own worker threads: a flood of probes cannot take the round's.

A coordinator on loopback (in process); probes are purerpc calls (no worker
threads of this trio run on the client side). The checkpoint's ``open`` is
stalled as on a hung mount by another process's write lease on it
(``fcntl(F_SETLEASE)``): the kernel holds each ``open`` until the lease is
given up, or for ``/proc/sys/fs/lease-break-time`` (45 s by default).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import purerpc
import trio
from helpers.peers import eventually
from helpers.stall import open_stalled

from fl_coordinator._proto import health_grpc, health_pb2
from fl_coordinator.app import serve
from fl_coordinator.config import Settings
from fl_coordinator.rpc.health import THREADS, thread_limiter
from fl_coordinator.storage.layout import Layout

PROBES = 45  # more than trio's 40 default threads


async def check(port: int) -> str:
    async with purerpc.insecure_channel("127.0.0.1", port) as channel:
        answer = await health_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


async def test_probes_stuck_reading_the_checkpoint_take_only_their_own_threads(
    settings: Settings, layout: Layout, nursery: trio.Nursery
) -> None:
    """The checkpoint's open stalled: 45 Checks at once fill the probes' THREADS threads,
    trio's default threads (the journal's, the aggregation's, the lease's) stay free, and
    every Check is answered NOT_SERVING within its 5 s; once the open goes on, SERVING.

    Before: each Check took one of the 40 default threads, for as long as the stall (its
    probe abandoned after 5 s): 45 Checks took them all, and nothing else could run in a
    thread.
    """
    endpoints = await nursery.start(serve, settings)
    port = endpoints.grpc_port
    answers: list[str] = []

    async def probe() -> None:
        answers.append(await check(port))

    with open_stalled(layout.checkpoint):
        async with trio.open_nursery() as probes:
            for _ in range(PROBES):
                probes.start_soon(probe)
            await eventually(lambda: thread_limiter().borrowed_tokens == THREADS)
            default = trio.to_thread.current_default_thread_limiter()
            assert (default.borrowed_tokens, default.total_tokens) == (0, 40)
            with trio.fail_after(10):  # (before: no thread left to run it)
                assert await trio.to_thread.run_sync(lambda: "ran") == "ran"
        assert answers == ["NOT_SERVING"] * PROBES
    await eventually(lambda: thread_limiter().borrowed_tokens == 0)
    assert await check(port) == "SERVING"


def datasets(path: Path) -> int:
    """How many datasets the HDF5 file at ``path`` holds (h5py: its global lock)."""
    found: list[str] = []
    with h5py.File(path, "r") as file:
        file.visititems(
            lambda name, item: found.append(name) if isinstance(item, h5py.Dataset) else None
        )
    return len(found)


async def test_a_probe_stuck_opening_the_checkpoint_leaves_h5py_to_the_round(
    settings: Settings, layout: Layout, nursery: trio.Nursery, keras_weights: list[Path]
) -> None:
    """The checkpoint's open stalled: a Check is answered NOT_SERVING within its 5 s, and
    while its probe still waits in the open, h5py reads a selector's aggregate in another
    thread (as the aggregation does): its 4 datasets, the probe still waiting after.

    Before: ``h5py.is_hdf5`` held h5py's global lock through the open, and every h5py call
    of the process waited for the stall to end; and h5py calls HDF5 without releasing the
    GIL, so the whole process stood still: the Check itself was answered only after the
    kernel's lease-break-time (45 s), not within its 5 s (a faulthandler dump at 15 s: the
    event loop's thread back from epoll, waiting; the probe's in ``is_hdf5``), the probe no
    longer waiting then (the test failed at the first ``waiting()``, after 48 s).
    """
    endpoints = await nursery.start(serve, settings)
    expected = datasets(keras_weights[0])
    with open_stalled(layout.checkpoint) as waiting:
        assert await check(endpoints.grpc_port) == "NOT_SERVING"
        assert waiting()  # the probe's thread is in its open
        assert await trio.to_thread.run_sync(datasets, keras_weights[0]) == expected == 4
        assert waiting()  # read while the probe still waited
    await eventually(lambda: thread_limiter().borrowed_tokens == 0)
    assert await check(endpoints.grpc_port) == "SERVING"
