"""The health service's own worker threads: a flood of probes cannot take the round's.

A coordinator on loopback (in process); probes are purerpc calls (no worker
threads of this trio run on the client side).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import purerpc
import trio
from h5py._objects import phil
from helpers.peers import eventually

from fl_coordinator._proto import health_grpc, health_pb2
from fl_coordinator.app import serve
from fl_coordinator.config import Settings
from fl_coordinator.rpc.health import THREADS, thread_limiter

PROBES = 45  # more than trio's 40 default threads


async def check(port: int) -> str:
    async with purerpc.insecure_channel("127.0.0.1", port) as channel:
        answer = await health_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


@contextmanager
def hdf5_stalled() -> Iterator[None]:
    """Every h5py call of this process waits (as behind a hung mount) until the block ends:
    another thread holds h5py's global lock, which ``h5py.is_hdf5`` takes first."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with phil:
            taken.set()
            done.wait(timeout=120)

    holder = threading.Thread(target=hold)
    holder.start()
    taken.wait()
    try:
        yield
    finally:
        done.set()
        holder.join()


async def test_probes_stuck_reading_the_checkpoint_take_only_their_own_threads(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """h5py stalled: 45 Checks at once fill the probes' THREADS threads, trio's default
    threads (the journal's, the aggregation's, the lease's) stay free, and every Check is
    answered NOT_SERVING within its 5 s; once h5py goes on, SERVING.

    Before: each Check took one of the 40 default threads, for as long as the stall (its
    probe abandoned after 5 s): 45 Checks took them all, and nothing else could run in a
    thread.
    """
    endpoints = await nursery.start(serve, settings)
    port = endpoints.grpc_port
    answers: list[str] = []

    async def probe() -> None:
        answers.append(await check(port))

    with hdf5_stalled():
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
