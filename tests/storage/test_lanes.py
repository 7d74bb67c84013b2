"""Lanes: every item once, in two threads; a failure stops the others and is what is raised;
refusals found by several lanes are merged; the average is the same bits in one lane or two."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.peers import read_floats

from fl_coordinator.core.strategy import STRATEGIES, ServerOptimizer, Strategy
from fl_coordinator.errors import ContributionsRefused, ShuttingDown
from fl_coordinator.storage import aggregation, slab
from fl_coordinator.storage.aggregation import Contribution, ServerUpdate, aggregate
from fl_coordinator.storage.lanes import Halt, in_lanes
from fl_coordinator.storage.pass_control import PassControl
from fl_coordinator.storage.strategy_state import StateUpdate
from fl_coordinator.storage.untrusted import UntrustedFile

#: Waits in these tests are bounded, never synchronization: a lane that never comes fails.
PATIENCE = 30.0


def _wait_for_halt(halt: Halt) -> bool:
    """What the averaging pass does between slabs: stop when told to (True), or give up."""
    deadline = time.monotonic() + PATIENCE
    while not halt.is_set():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.001)
    return True


def test_every_item_once_in_two_threads() -> None:
    seen: list[tuple[int, str]] = []
    both = threading.Barrier(2, timeout=PATIENCE)

    def work(item: int, context: str, halt: Halt) -> int:
        if item < 2:
            both.wait()  # the first two items are taken by different lanes
        seen.append((item, threading.current_thread().name))
        return item * 10

    total = in_lanes(list(range(20)), work, ["a", "b"], None)
    assert total == sum(range(20)) * 10
    assert sorted(item for item, _ in seen) == list(range(20))
    assert len({name for _, name in seen}) == 2


def test_one_item_is_done_in_the_callers_thread() -> None:
    """No thread is started where a second lane would have nothing to take."""
    names: list[str] = []

    def work(item: int, context: str, halt: Halt) -> int:
        names.append(threading.current_thread().name)
        return item

    assert in_lanes([7], work, ["a", "b"], None) == 7
    assert names == [threading.current_thread().name]


def test_a_failure_stops_the_other_lane_and_is_raised() -> None:
    both = threading.Barrier(2, timeout=PATIENCE)
    ran: list[int] = []
    halted: list[bool] = []

    def work(item: int, context: None, halt: Halt) -> int:
        ran.append(item)
        if item < 2:
            both.wait()
        if item == 0:
            raise ValueError("lane 0's array is broken")
        halted.append(_wait_for_halt(halt))
        raise ShuttingDown("stopped")

    with pytest.raises(ValueError, match="lane 0's array is broken"):
        in_lanes(list(range(10)), work, [None, None], None)
    assert sorted(ran) == [0, 1]  # neither lane took another item
    assert halted == [True]


def test_refusals_of_several_lanes_are_merged() -> None:
    both = threading.Barrier(2, timeout=PATIENCE)

    def work(item: str, context: None, halt: Halt) -> int:
        both.wait()
        raise ContributionsRefused({item: f"{item} is bad"})

    with pytest.raises(ContributionsRefused) as refused:
        in_lanes(["s1", "s2"], work, [None, None], None)
    assert refused.value.reasons == {"s1": "s1 is bad", "s2": "s2 is bad"}


def test_the_callers_cancel_stops_every_lane() -> None:
    cancel = PassControl()
    cancel.stop()

    ran: list[int] = []

    def work(item: int, context: None, halt: Halt) -> int:
        ran.append(item)
        assert _wait_for_halt(halt)
        raise ShuttingDown("stopped")

    with pytest.raises(ShuttingDown):
        in_lanes(list(range(4)), work, [None, None], cancel)
    assert len(ran) <= 2  # each lane stopped at its first item


def _write(path: Path, seed: int) -> Path:
    import h5py

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        for index in range(6):
            file[f"layers/d{index}/vars/0"] = rng.normal(size=(300, 7 + index)).astype(np.float32)
    return path


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("lanes", [1, 2])
def test_the_average_is_the_same_bits_in_one_lane_or_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lanes: int, strategy: str
) -> None:
    """Two rounds (the second reads the optimizer state the first wrote, if any)."""
    monkeypatch.setattr(slab, "SLAB_BYTES", 4096)  # several slabs per array
    used: set[str] = set()
    write_weight = aggregation._write_weight
    # The first two arrays wait for each other: each lane takes one (else, on a busy
    # machine, one lane could take them all before the other thread started).
    both = threading.Barrier(lanes, timeout=PATIENCE)
    calls: list[None] = []

    def recorded(*args: object, **named: object) -> int:
        used.add(threading.current_thread().name)
        calls.append(None)
        if lanes == aggregation.LANES and len(calls) <= lanes:
            both.wait()
        return write_weight(*args, **named)  # type: ignore[arg-type]

    monkeypatch.setattr(aggregation, "_write_weight", recorded)
    optimizer = ServerOptimizer.of(strategy)
    results = {}
    for count in (1, lanes):
        monkeypatch.setattr(aggregation, "LANES", count)
        folder = tmp_path / str(count)
        checkpoint = _write(folder / "fl_checkpoint", 0)
        parts = [
            Contribution(f"s{i}", UntrustedFile.at(_write(folder / f"s{i}", i + 1)), i + 2)
            for i in range(3)
        ]
        state = None
        for round_number in (1, 2):
            used.clear()
            calls.clear()
            update = None
            if optimizer.moments:
                dest = folder / f"state{round_number}.h5"
                update = ServerUpdate(
                    Strategy(optimizer), StateUpdate(optimizer, state, dest, round_number)
                )
                state = dest
            aggregate(checkpoint, parts, folder / "tmp", None, update)
            assert len(used) == count
        results[count] = read_floats(checkpoint)
        if state is not None:
            results[count].update({f"state/{k}": v for k, v in read_floats(state).items()})
    assert len(results[1]) == 6 * (1 + len(optimizer.moments))  # and m (and v) of each array
    for name, values in results[1].items():
        assert values.tobytes() == results[lanes][name].tobytes(), name


def test_a_bad_input_found_by_the_second_lane_is_refused_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN in the last array of one input: refused (that selector alone), nothing written."""
    import h5py

    monkeypatch.setattr(aggregation, "LANES", 2)
    checkpoint = _write(tmp_path / "fl_checkpoint", 0)
    paths = [_write(tmp_path / f"s{i}", i + 1) for i in range(3)]
    with h5py.File(paths[1], "r+") as file:
        file["layers/d5/vars/0"][7, 3] = np.nan
    before = checkpoint.read_bytes()
    parts = [Contribution(f"s{i}", UntrustedFile.at(p), 1) for i, p in enumerate(paths)]
    with pytest.raises(ContributionsRefused) as refused:
        aggregate(checkpoint, parts, tmp_path / "tmp")
    assert list(refused.value.reasons) == ["s1"]
    assert "layers/d5/vars/0" in refused.value.reasons["s1"]
    assert checkpoint.read_bytes() == before
    assert list((tmp_path / "tmp").iterdir()) == []


_PEAK_IN_A_PROCESS = """
import sys
from pathlib import Path
from fl_coordinator.storage import aggregation
from fl_coordinator.storage.aggregation import Contribution, aggregate
from fl_coordinator.storage.untrusted import UntrustedFile
aggregation.LANES = int(sys.argv[2])
folder = Path(sys.argv[1])
parts = [Contribution(f"s{i}", UntrustedFile.at(folder / f"s{i}"), 1) for i in range(2)]
def kb(key):
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith(key)).split()[1])
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
before = kb("VmRSS:")
aggregate(folder / "fl_checkpoint", parts, folder / "tmp")
print(kb("VmHWM:") - before)
"""


def test_arrays_of_one_wide_row_are_averaged_a_slab_at_a_time(tmp_path: Path) -> None:
    """Arrays of one row of 16 MB: slabs are cut within the row, in one lane or two.

    Before, a slab was whole rows: one lane held the row's float64 sum, the
    result and a read buffer (the peak RSS grew by 64 MB, four times the
    array), two lanes two such arrays at once (125 MB), then (rt6) such arrays
    were averaged alone, still 64 MB."""
    import subprocess
    import sys

    import h5py

    growth = {}
    for lanes in (1, 2):
        folder = tmp_path / str(lanes)
        folder.mkdir()
        for name, value in (("fl_checkpoint", 1.0), ("s0", 2.0), ("s1", 3.0)):
            with h5py.File(folder / name, "w") as file:
                for index in range(4):
                    file[f"layers/d{index}/vars/0"] = np.full((1, 4_000_000), value, np.float32)
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_IN_A_PROCESS, str(folder), str(lanes)],
            check=True,
            capture_output=True,
            text=True,
        )
        growth[lanes] = int(done.stdout) / 1024  # MB
        assert np.all(read_floats(folder / "fl_checkpoint")["layers/d3/vars/0"] == 3.5)
    assert growth[1] < 16 and growth[2] < 16, growth  # less than one array (16 MB)
