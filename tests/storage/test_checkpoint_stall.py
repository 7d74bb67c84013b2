"""The global checkpoint on a hung mount: the aggregation waits, the process does not.

h5py calls HDF5 holding the GIL: where HDF5 itself opened and read the checkpoint
(its sec2 driver), an ``open`` the kernel kept waiting stopped every thread of the
coordinator, the event loop included. The coordinator's own files are now opened by
a descriptor of ours and read through a Python file object (``storage/hdf5_fd.py``),
whose system calls release the GIL. The stall: another process's write lease on the
checkpoint (``helpers.stall``), which holds its ``open`` for up to 45 s.
"""

from __future__ import annotations

from pathlib import Path

import trio
from helpers.peers import (
    aggregating_round,
    assert_arrays_close,
    completed,
    eventually,
    fedavg,
    read_floats,
)
from helpers.stall import open_stalled
from rpc.test_health_probes import check

from fl_coordinator.config import Settings
from fl_coordinator.storage.layout import Layout


async def test_an_aggregation_stuck_opening_the_checkpoint_leaves_the_event_loop_running(
    settings: Settings, layout: Layout, keras_weights: list[Path], nursery: trio.Nursery
) -> None:
    """Round 1 aggregates while the checkpoint's ``open`` is stalled: a health Check is
    answered (NOT_SERVING: its probe's open is stalled too) while the aggregation's
    thread still waits in its open; released, the round completes with FedAvg's result.

    Before (795ac0c): the aggregation's ``h5py.File(checkpoint)`` held the GIL through
    its ``open``, and the whole process stood still for the lease-break-time (45 s): the
    test's own loop never saw the open waiting (the lease was broken when it ran again),
    and failed after 49 s at ``eventually(waiting)``.
    """
    expected = fedavg(read_floats(layout.checkpoint), [(keras_weights[0], 1)])
    endpoints, watcher, _, release = await aggregating_round(
        settings, layout, keras_weights, nursery
    )
    with open_stalled(layout.checkpoint) as waiting:
        release.set()
        await eventually(waiting)  # the aggregation's thread waits in its open
        assert await check(endpoints.grpc_port) == "NOT_SERVING"
        assert waiting()  # answered while the aggregation still waited
        last = watcher.messages[-1]
        assert (last["round"], last["stage"], last["aggregating"]) == (1, "REPORTING", True)
    done = await watcher.wait_for(completed(1))
    assert done["stage"] == "COMPLETED", done
    assert_arrays_close(read_floats(layout.checkpoint), expected)
