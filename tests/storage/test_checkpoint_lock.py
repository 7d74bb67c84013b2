"""Another process holds the global checkpoint open for writing: no selector is blamed.

HDF5 locks the files it opens; a process with ``initFiles/fl_checkpoint`` open
in h5py's mode ``"a"`` makes the coordinator's open fail at once ("unable to
lock file, errno = 11"). The selectors' files are checked against the plan
read at start-up, so they are accepted; the aggregation waits for the lock
within the reporting window, then the round fails naming the file and the lock.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from helpers.peers import (
    assert_arrays_close,
    completed,
    fedavg,
    read_floats,
    run_round,
    serve_and_watch,
)

from fl_coordinator.config import Settings
from fl_coordinator.storage.layout import Layout

HOLD = (
    "import sys, h5py\n"
    "file = h5py.File(sys.argv[1], 'a')\n"
    "print('holding', flush=True)\n"
    "sys.stdin.read()\n"
)


class Holder:
    """Another process with ``path`` open for writing (h5py mode "a") until released."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stdin is not None
        assert self.process.stdout.readline() == "holding\n"

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0


@pytest.fixture
def hold(layout: Layout):
    """Start holding the checkpoint (after the coordinator started: it refuses a locked one)."""
    held: list[Holder] = []
    yield lambda: held.append(Holder(layout.checkpoint)) or held[0]
    for holder in held:
        if holder.process.poll() is None:
            holder.release()


class LockSeen(logging.Handler):
    """Sets ``seen`` when the coordinator logs that the checkpoint is locked."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "locked by another process" in record.getMessage():
            self.seen.set()  # logged by the round task, in trio's thread


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_locked_checkpoint_fails_the_round_after_the_window_and_blames_no_selector(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery, hold
) -> None:
    endpoints, watcher, _ = await serve_and_watch(nursery, settings.replace(reporting_timeout=4))
    holder = hold()
    before = digest(layout.checkpoint)  # as the holder left it when it opened it
    sources = [(keras_weights[0], 2), (keras_weights[1], 3)]
    failed = await run_round(nursery, endpoints.grpc_port, watcher, layout, sources)
    assert failed["stage"] == "FAILED"
    assert failed["rejected"] == {} and len(failed["reported"]) == 2
    error = failed["error"]
    assert error.startswith(f"{layout.checkpoint}: the checkpoint is locked by another process")
    assert "errno = 11" in error and "gave up after waiting 4 s" in error
    assert "HDF5_USE_FILE_LOCKING" in error
    assert digest(layout.checkpoint) == before

    await trio.to_thread.run_sync(holder.release)
    done = await run_round(nursery, endpoints.grpc_port, watcher, layout, sources, number=2)
    assert (done["stage"], done["rejected"]) == ("COMPLETED", {})


async def test_the_aggregation_waits_for_the_lock_to_go(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery, hold
) -> None:
    start = read_floats(layout.checkpoint)
    lock_seen = LockSeen()
    logging.getLogger("fl_coordinator").addHandler(lock_seen)
    try:
        unlimited = settings.replace(reporting_timeout=0)  # wait as long as it takes
        endpoints, watcher, _ = await serve_and_watch(nursery, unlimited)
        holder = hold()
        sources = [(keras_weights[0], 2), (keras_weights[1], 3)]
        nursery.start_soon(run_round, nursery, endpoints.grpc_port, watcher, layout, sources)
        await lock_seen.seen.wait()  # the aggregation met the lock and waits
        await trio.to_thread.run_sync(holder.release)
        done = await watcher.wait_for(completed(1))
    finally:
        logging.getLogger("fl_coordinator").removeHandler(lock_seen)
    assert (done["stage"], done["rejected"]) == ("COMPLETED", {})
    assert_arrays_close(read_floats(layout.checkpoint), fedavg(start, sources))
