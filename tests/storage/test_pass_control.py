"""A pass waiting on a selector's storage for ever is given up, and then never publishes.

The pure logic (stop against publish, overdue waits, passes held inside
HDF5) with a clock the test moves; then real passes over a FUSE file system
whose reads get no answer (a hung mount) while a gate file exists.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import trio
from helpers.selector_fs import HANG, mounted, needs_fuse
from storage.test_aggregation import digest, leftovers, updates_like, write_h5

from fl_coordinator.core.strategy import ServerOptimizer, Strategy
from fl_coordinator.errors import ShuttingDown
from fl_coordinator.storage.aggregation import Contribution, ServerUpdate, aggregate
from fl_coordinator.storage.contribution import CheckpointSpec, SelectorFiles, examine
from fl_coordinator.storage.pass_control import PassControl, Stuck, given_up, held_in_hdf5
from fl_coordinator.storage.round_files import canceller
from fl_coordinator.storage.strategy_state import StateUpdate
from fl_coordinator.storage.untrusted import UntrustedFile
from fl_coordinator.storage.weights import read_plan

#: Waits in these tests are bounded, never synchronization: what never comes fails.
PATIENCE = 60.0
#: The watchdog's limit in the FUSE tests: no read of a small file on a good one nears it.
LIMIT = 2.0


class Clock:
    """Seconds the test sets."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stopped_pass_cannot_publish_and_a_publishing_one_cannot_be_stopped() -> None:
    stopped = PassControl()
    assert (stopped.stop(), stopped.is_set()) == (True, True)
    with pytest.raises(ShuttingDown):
        stopped.publishing()
    publishing = PassControl()
    publishing.publishing()
    assert (publishing.stop(), publishing.is_set()) == (False, False)


def test_only_a_wait_longer_than_the_limit_is_overdue_the_innermost_one_counting() -> None:
    clock = Clock()
    control = PassControl(clock)
    outer, inner = Path("/sel/a"), Path("/sel/b")
    assert control.overdue(10) is None
    with control.waiting_on(outer):
        clock.now += 10
        assert control.overdue(10) is None  # exactly the limit: not over it
        with control.waiting_on(inner, in_hdf5=True):
            clock.now += 10.5
            assert control.overdue(10) == Stuck(inner, 110.0, True)
        # The inner call was answered: the outer wait begins again (a copy of many
        # answered reads is not one wait).
        assert control.overdue(10) is None
        clock.now += 11
        assert control.overdue(10) == Stuck(outer, 120.5, False)
    assert control.overdue(0) is None


def test_the_oldest_of_several_threads_waits_is_named() -> None:
    clock = Clock()
    control = PassControl(clock)
    entered, release = threading.Barrier(2, timeout=PATIENCE), threading.Event()

    def other() -> None:
        with control.waiting_on(Path("/sel/late")):
            entered.wait()
            release.wait(PATIENCE)

    with control.waiting_on(Path("/sel/early")):
        clock.now += 1
        thread = threading.Thread(target=other)
        thread.start()
        entered.wait()
        clock.now += 30
        assert control.overdue(5) == Stuck(Path("/sel/early"), 100.0, False)
        release.set()
        thread.join(PATIENCE)


def test_giving_up_stops_the_pass_once_and_a_pass_held_in_hdf5_is_remembered() -> None:
    clock = Clock()
    control = PassControl(clock)
    with control.waiting_on(Path("/sel/x"), in_hdf5=True):
        assert control.give_up_if_stuck(5) is False  # not overdue yet
        clock.now += 6
        assert control.give_up_if_stuck(5) is True
        assert control.is_set()
        assert held_in_hdf5() == control.stuck == Stuck(Path("/sel/x"), 100.0, True)
    control.ended()  # its thread ends, when the storage answers
    assert held_in_hdf5() is None
    publishing = PassControl(clock)
    publishing.publishing()
    with publishing.waiting_on(Path("/sel/y"), in_hdf5=True):
        clock.now += 60
        assert publishing.give_up_if_stuck(5) is False  # it is replacing the checkpoint
    assert (publishing.stuck, held_in_hdf5()) == (None, None)


def test_the_files_of_a_pass_given_up_are_emptied_those_noted_later_at_once(
    tmp_path: Path,
) -> None:
    files = {name: tmp_path / name for name in ("output", "copy", "later", "removed")}
    for path in files.values():
        path.write_bytes(b"x" * 10_000)
    clock = Clock()
    control = PassControl(clock)
    for name in ("output", "copy", "removed"):
        control.scratch(files[name])
    files["removed"].unlink()  # its pass removed it meanwhile: nothing to empty
    with control.waiting_on(Path("/sel/x")):
        clock.now += 6
        assert control.give_up_if_stuck(5) is True
    assert not control.space_given_back.is_set()
    control.give_back_space()
    assert control.space_given_back.is_set()
    sizes = {name: path.stat().st_size for name, path in files.items() if path.exists()}
    assert sizes == {"output": 0, "copy": 0, "later": 10_000}
    control.scratch(files["later"])  # a copy the pass began as it was given up
    assert files["later"].stat().st_size == 0
    control.ended()


def test_what_a_pass_meets_once_its_files_were_emptied_is_a_stop_not_their_fault() -> None:
    clock = Clock()
    control = PassControl(clock)
    with pytest.raises(ValueError), control.emptied_is_stopped():
        raise ValueError("a genuine error, before any give-up")
    with control.waiting_on(Path("/sel/x")):
        clock.now += 6
        assert control.give_up_if_stuck(5) is True
    with pytest.raises(ValueError), control.emptied_is_stopped():
        raise ValueError("given up, its files not emptied yet: what it met is its own")
    control.give_back_space()
    with pytest.raises(ShuttingDown) as stopped, control.emptied_is_stopped():
        raise ValueError("a copy read after it was emptied: cut short")
    assert isinstance(stopped.value.__cause__, ValueError)
    control.ended()


def test_the_caller_is_told_before_the_files_are_emptied_on_storage_of_our_own_that_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emptying is I/O on the coordinator's own storage, which may hang too: the caller
    is told first, and a truncate that never answers holds only the watchdog."""
    entered, answer, told = threading.Event(), threading.Event(), threading.Event()

    def hung_truncate(path: object, length: int) -> None:
        entered.set()
        assert answer.wait(PATIENCE)

    monkeypatch.setattr("fl_coordinator.storage.pass_control.os.truncate", hung_truncate)
    clock = Clock()
    control = PassControl(clock)
    control.scratch(tmp_path / "output")
    with control.waiting_on(Path("/sel/x")), control.watched(0.04, told.set):
        clock.now += 1  # overdue: the watchdog gives the pass up at its next look
        assert told.wait(PATIENCE)
        assert entered.wait(PATIENCE)
    assert not control.space_given_back.is_set()  # the truncate has not answered
    answer.set()
    assert control.space_given_back.wait(PATIENCE)
    control.ended()


def test_a_pass_that_ended_before_it_was_given_up_is_not_held() -> None:
    clock = Clock()
    control = PassControl(clock)
    with control.waiting_on(Path("/sel/x"), in_hdf5=True):
        clock.now += 6
        control.ended()  # the race: the thread ends as the watchdog looks
        assert control.give_up_if_stuck(5) is True
    assert held_in_hdf5() is None


def test_a_pass_left_while_its_thread_still_waits_is_remembered_with_that_wait() -> None:
    """The caller cancelled (a shutdown) before any limit: a thread still inside HDF5
    must keep the process from HDF5's exit handler, as one given up does."""
    clock = Clock()
    waiting, done = PassControl(clock), PassControl(clock)
    done.ended()  # its thread ended first: nothing left to wait for
    done.left()
    with waiting.waiting_on(Path("/sel/x"), in_hdf5=True):
        clock.now += 1
        waiting.left()
        assert waiting.is_set()
        assert given_up() == [waiting]
        assert held_in_hdf5() == waiting.stuck == Stuck(Path("/sel/x"), 100.0, True)
    waiting.ended()
    assert (given_up(), held_in_hdf5()) == ([], None)


def test_a_watchdog_that_gives_up_after_the_loop_ended_cancels_nothing_and_raises_nothing() -> None:
    """The watchdog's thread may find a wait overdue just as the pass's trio run ends
    (a shutdown): trio then refuses the call into the loop (RunFinishedError), which
    was a traceback on stderr from that thread."""
    made: list = []

    async def main() -> None:
        scope = trio.CancelScope()
        made.extend([scope, canceller(scope)])

    trio.run(main)
    _, cancel = made
    assert cancel() is None  # before: RunFinishedError, from the watchdog's thread


def _selectors(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The global checkpoint (two weight arrays), ``root`` with selector ``good``'s files,
    and ``served``: what selector ``bad``'s storage shows (mounted at ``root/bad``)."""
    rng = np.random.default_rng(3)
    arrays = {f"layers/d{i}/vars/0": rng.normal(size=(64, 64)).astype(np.float32) for i in (0, 1)}
    checkpoint = write_h5(tmp_path / "fl_checkpoint", arrays)
    for folder, seed, weight in ((tmp_path / "root/good", 1, 1), (tmp_path / "served", 2, 3)):
        folder.mkdir(parents=True)
        write_h5(folder / "agg", updates_like(arrays, seed))
        (folder / "weight").write_text(f"{weight}\n")
    return checkpoint, tmp_path / "root", tmp_path / "served"


def _checked(checkpoint: Path, root: Path, selectors: tuple[str, ...]) -> list[Contribution]:
    with h5py.File(checkpoint, "r") as file:
        spec = CheckpointSpec(tuple(read_plan(file, checkpoint)), checkpoint.stat().st_size)
    return [examine(s, SelectorFiles(root, "agg", "weight"), spec) for s in selectors]


class Ticks:
    """A clock that moves one second each time it is read: the only time that passes is
    the pass's own marks (and the test's look)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@needs_fuse
@pytest.mark.fuse
def test_a_copy_of_an_input_in_chunks_is_timed_read_by_read_not_as_one_wait(
    tmp_path: Path,
) -> None:
    """An honest selector's aggregate in chunks is copied in blocks of whole chunks (32
    MiB: 4 blocks). A read late in the copy hangs: the wait found is that read's, begun
    after the reads before it were answered, not the whole copy's: a copy longer than
    CHECK_TIMEOUT, each read answered, refused the selector as if its storage hung."""
    rng = np.random.default_rng(5)
    shape = (2048, 1024)  # float32: 8 MiB, one block; chunks of 128 KiB, one FUSE read each
    arrays = {f"layers/d{i}/vars/0": rng.normal(size=shape).astype(np.float32) for i in range(4)}
    checkpoint = write_h5(tmp_path / "fl_checkpoint", arrays)
    served, root, gate = tmp_path / "served", tmp_path / "root", tmp_path / "hang"
    served.mkdir()
    root.mkdir()
    with h5py.File(served / "agg", "w") as file:
        for name, values in arrays.items():
            file.create_dataset(name, data=values, chunks=(32, 1024))
    clock, outcome = Ticks(), {}
    control = PassControl(clock)
    bad = Contribution("bad", UntrustedFile(root, "bad/agg"), 3)  # copied by the pass

    def run() -> None:
        try:
            aggregate(checkpoint, [bad], tmp_path / "tmp", control)
        except BaseException as error:
            outcome["error"] = error
        finally:
            control.ended()

    # 256 chunk reads in all, and HDF5's own: the 200th is in the 3rd block or later.
    with mounted(served, root / "bad", "agg", "read", HANG, after=200, gate=gate) as mount:
        gate.touch()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        mount.held()  # the copy's 200th read reached the storage, which holds it
        stuck = control.overdue(0)
        assert stuck is not None and (stuck.path, stuck.in_hdf5) == (root / "bad/agg", True)
        # Marks before it: the input's open (tick 1), then 2 per block read and per
        # refresh (begun, answered): at least 2 blocks and their refreshes.
        assert stuck.since >= 1 + 2 * 4, stuck
        control.stop()
        gate.unlink()
        thread.join(PATIENCE)
        assert not thread.is_alive()
    assert isinstance(outcome["error"], ShuttingDown)


def _given_up(
    checkpoint: Path, inputs: list[Contribution], tmp: Path, update: ServerUpdate | None = None
) -> tuple:
    """Run a pass in a thread, watched with LIMIT: (control, thread, outcome) once it was
    given up (the thread still waits on the storage)."""
    control, given_up, outcome = PassControl(), threading.Event(), {}

    def run() -> None:
        try:
            aggregate(checkpoint, inputs, tmp, control, update)
        except BaseException as error:
            outcome["error"] = error
        finally:
            control.ended()

    thread = threading.Thread(target=run, daemon=True)
    with control.watched(LIMIT, given_up.set):
        thread.start()
        assert given_up.wait(PATIENCE), "the watchdog never gave the pass up"
    return control, thread, outcome


@needs_fuse
@pytest.mark.fuse
@pytest.mark.parametrize("answer", [HANG, errno.EINTR], ids=["no answer", "EINTR"])
def test_a_read_that_never_answers_is_given_up_and_the_pass_never_publishes(
    tmp_path: Path, answer: int
) -> None:
    """``bad`` passed its check; then its storage stops answering reads (or answers EINTR to
    each, which Python tries again for ever). The watchdog names
    its file once a read has waited more than the limit, stops the pass, and the thread,
    freed when the storage answers at last, leaves the checkpoint as it was and nothing in
    tmp (the pass was stopped before it published: it never does after)."""
    checkpoint, root, served = _selectors(tmp_path)
    before, gate = digest(checkpoint), tmp_path / "hang"
    with mounted(served, root / "bad", "agg", "read", answer, gate=gate):
        inputs = _checked(checkpoint, root, ("good", "bad"))
        assert inputs[1].plain is not None  # read with preadv at its extents, no HDF5
        gate.touch()
        control, thread, outcome = _given_up(checkpoint, inputs, tmp_path / "tmp")
        assert control.stuck is not None
        assert (control.stuck.path, control.stuck.in_hdf5) == (root / "bad/agg", False)
        assert held_in_hdf5() is None  # no HDF5 call is held: other passes may run
        assert control.is_set() and thread.is_alive()
        gate.unlink()  # the storage answers at last
        thread.join(PATIENCE)
        assert not thread.is_alive()
    assert isinstance(outcome["error"], ShuttingDown)
    assert digest(checkpoint) == before
    assert leftovers(tmp_path / "tmp") == []


def _emptied_as_given_up(
    checkpoint: Path,
    inputs: list[Contribution],
    tmp: Path,
    gate: Path,
    expected: set[str],
    update: ServerUpdate | None = None,
) -> dict:
    """Give a pass up on the storage held while ``gate`` exists; check that the files it
    left in ``tmp`` (``expected``: their names' first word, after the dot) are emptied while
    its thread still waits; then let the storage answer: the thread's outcome."""
    gate.touch()
    control, thread, outcome = _given_up(checkpoint, inputs, tmp, update)
    assert control.space_given_back.wait(PATIENCE)
    kept = {path.name.split(".")[1]: path.stat() for path in tmp.iterdir()}
    assert set(kept) == expected
    assert {(status.st_size, status.st_blocks) for status in kept.values()} == {(0, 0)}
    assert thread.is_alive()  # still waiting on the storage
    gate.unlink()
    thread.join(PATIENCE)
    assert not thread.is_alive()
    return outcome


@needs_fuse
@pytest.mark.fuse
# The check reads every chunk too: a chunked input's reads 180 to 340 are its copy's.
@pytest.mark.parametrize(("layout", "after"), [("plain", 1), ("chunked", 260)])
def test_a_pass_given_up_gives_the_space_of_its_files_back_at_once(
    tmp_path: Path, layout: str, after: int
) -> None:
    """The pass's output holds a checkpoint's size, reserved, and a copy of a chunked
    input its own (see .plain_copy), until its thread removes them as it ends: never,
    while the storage it waits on does not answer. Each pass given up in turn (the round
    goes on without that selector) took another checkpoint's worth of the coordinator's
    disk. They are emptied as the pass is given up, and removed once its thread ends."""
    checkpoint, root, served = _selectors(tmp_path)
    gate, tmp = tmp_path / "hang", tmp_path / "tmp"
    if layout == "chunked":  # copied by the pass, chunk by chunk (128 reads)
        names = [f"layers/d{i}/vars/0" for i in (0, 1)]
        with h5py.File(served / "agg") as plain:
            arrays = {name: plain[name][()] for name in names}
        with h5py.File(served / "agg", "w") as chunked:
            for name, values in arrays.items():
                chunked.create_dataset(name, data=values, chunks=(1, 64))
    with mounted(served, root / "bad", "agg", "read", HANG, after=after, gate=gate):
        good, bad = _checked(checkpoint, root, ("good", "bad"))
        assert (bad.plain is None) == (layout == "chunked")
        expected = {"fl_checkpoint", "input-copy"} if layout == "chunked" else {"fl_checkpoint"}
        outcome = _emptied_as_given_up(checkpoint, [good, bad], tmp, gate, expected)
    assert isinstance(outcome["error"], ShuttingDown)
    assert leftovers(tmp) == []


@needs_fuse
@pytest.mark.fuse
@pytest.mark.parametrize("old", [None, "plain", "chunked"])
def test_a_pass_given_up_gives_back_the_space_of_the_optimizers_new_state_too(
    tmp_path: Path, old: str | None
) -> None:
    """With a server optimizer keeping moments (FedAdam: m and v), the pass also writes
    the new state (two moments per weight, reserved), and copies old moments that are
    not plain (a state in chunks): emptied as the pass is given up, like its output."""
    optimizer = ServerOptimizer.of("fedadam")
    checkpoint, root, served = _selectors(tmp_path)
    gate, tmp = tmp_path / "hang", tmp_path / "tmp"
    source = None
    if old is not None:  # a first round, with the good selector alone, wrote a state
        source = tmp_path / "state1.h5"
        first = ServerUpdate(Strategy(optimizer), StateUpdate(optimizer, None, source, 1))
        aggregate(checkpoint, _checked(checkpoint, root, ("good",)), tmp, None, first)
    if old == "chunked":
        with h5py.File(source, "r") as file:
            moments = {f"{m}/{n}": file[f"{m}/{n}"][()] for m in ("m", "v")
                       for n in (f"layers/d{i}/vars/0" for i in (0, 1))}  # fmt: skip
            attributes = dict(file.attrs)
        with h5py.File(source, "w") as file:
            for name, values in moments.items():
                file.create_dataset(name, data=values, chunks=(1, 64))
            file.attrs.update(attributes)
    update = ServerUpdate(
        Strategy(optimizer), StateUpdate(optimizer, source, tmp_path / "state2.h5", 2)
    )
    before = digest(checkpoint)
    with mounted(served, root / "bad", "agg", "read", HANG, after=1, gate=gate):
        good, bad = _checked(checkpoint, root, ("good", "bad"))
        expected = {"fl_checkpoint", "state2"} | ({"input-copy"} if old == "chunked" else set())
        outcome = _emptied_as_given_up(checkpoint, [good, bad], tmp, gate, expected, update)
    assert isinstance(outcome["error"], ShuttingDown)
    assert leftovers(tmp) == []
    assert digest(checkpoint) == before
    assert not (tmp_path / "state2.h5").exists()


@needs_fuse
@pytest.mark.fuse
def test_a_pass_stuck_inside_hdf5_is_held_until_its_thread_ends(tmp_path: Path) -> None:
    """An input without the extents a check finds is opened through HDF5, whose lock the
    stuck read then holds: the pass is remembered as held until its thread ends."""
    checkpoint, root, served = _selectors(tmp_path)
    before, gate = digest(checkpoint), tmp_path / "hang"
    (good,) = _checked(checkpoint, root, ("good",))
    bad = Contribution("bad", UntrustedFile(root, "bad/agg"), 3)  # located by the pass
    with mounted(served, root / "bad", "agg", "read", HANG, gate=gate):
        gate.touch()
        control, thread, outcome = _given_up(checkpoint, [good, bad], tmp_path / "tmp")
        assert control.stuck is not None
        assert (control.stuck.path, control.stuck.in_hdf5) == (root / "bad/agg", True)
        assert held_in_hdf5() == control.stuck
        assert given_up() == [control]
        gate.unlink()
        thread.join(PATIENCE)
        assert not thread.is_alive()
    assert (held_in_hdf5(), given_up()) == (None, [])
    assert isinstance(outcome["error"], ShuttingDown)
    assert digest(checkpoint) == before
    assert leftovers(tmp_path / "tmp") == []
