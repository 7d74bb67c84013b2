"""The check in worker processes: its memory limit, a worker that dies, the global checkpoint."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import trio
import trio.testing
from helpers.fatal_file import fatal_to_open
from helpers.peers import write_aggregate
from helpers.resources import (
    check_workers,
    ended,
    exists,
    job_sent_to,
    out_of_descriptors,
    vm_size,
    when_logged,
)
from helpers.selector_fs import mounted, needs_fuse

from fl_coordinator.errors import OutOfResources
from fl_coordinator.storage import checker as checker_module
from fl_coordinator.storage import contribution
from fl_coordinator.storage.aggregation import Contribution
from fl_coordinator.storage.checker import ContributionChecker
from fl_coordinator.storage.checkpoint import read_checkpoint_plan
from fl_coordinator.storage.contribution import (
    SETTLE_SECONDS,
    CheckpointSpec,
    NotSettled,
    SelectorFiles,
    examine,
)
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.untrusted import OwnShortage

SELECTOR = "127.0.0.1:1"


def spec_of(layout: Layout) -> CheckpointSpec:
    """What the coordinator checks against: its checkpoint's plan, read at start-up."""
    return CheckpointSpec(read_checkpoint_plan(layout.checkpoint), layout.checkpoint.stat().st_size)


@pytest.fixture
def reported(layout: Layout, keras_weights: list[Path]) -> Layout:
    write_aggregate(layout, SELECTOR, keras_weights[0], weight=5)
    return layout


async def test_a_good_contribution_comes_back_with_its_weight_and_identity(
    reported: Layout,
) -> None:
    checker = ContributionChecker(reported, spec_of(reported), timeout=60, workers=1)
    async with checker.running():
        found = await checker.check(SELECTOR)
    assert isinstance(found, Contribution)
    assert (found.selector, found.weight) == (SELECTOR, 5)
    assert found.checkpoint.path == reported.agg_checkpoint(SELECTOR)
    assert found.checkpoint.identity is not None
    assert found.checkpoint.identity.inode == reported.agg_checkpoint(SELECTOR).stat().st_ino
    assert check_workers() == []  # ended with the checker


async def test_a_check_that_needs_more_memory_than_its_budget_is_rejected(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = {"layers/big/vars/0": np.zeros((1024, 1024), np.float32)}  # a slab is 4 MiB
    for path in (layout.checkpoint, layout.agg_checkpoint(SELECTOR)):
        path.parent.mkdir(exist_ok=True)
        with h5py.File(path, "w") as file:
            file.update(big)
    layout.agg_weight(SELECTOR).write_text("5\n")
    reported = layout
    monkeypatch.setattr(checker_module, "MEMORY_BUDGET", 2**20)  # 1 MiB: less than a slab
    checker = ContributionChecker(reported, spec_of(reported), timeout=60, workers=1)
    async with checker.running():
        found = await checker.check(SELECTOR)
        assert found == (
            f"{reported.selector_dir(SELECTOR)}: checking these files needed more than 1 MiB "
            "of memory"
        )
        monkeypatch.undo()  # the same worker, its limit lifted, checks as usual again
        assert isinstance(await checker.check(SELECTOR), Contribution)


async def test_a_worker_that_dies_during_a_check_rejects_only_that_check(
    reported: Layout,
) -> None:
    checker = ContributionChecker(reported, spec_of(reported), timeout=60, workers=1)
    async with checker.running():
        assert isinstance(await checker.check(SELECTOR), Contribution)  # a worker is up
        (worker,) = check_workers()
        os.kill(worker, signal.SIGSTOP)  # it takes the next check and makes no progress
        async with trio.open_nursery() as nursery:
            result: list[object] = []

            async def check() -> None:
                result.append(await checker.check(SELECTOR))

            nursery.start_soon(check)
            await job_sent_to(worker)
            os.kill(worker, signal.SIGKILL)
        assert result == [
            f"{reported.selector_dir(SELECTOR)}: checking these files ended its worker process "
            f"(exit {-signal.SIGKILL})"
        ]
        assert not exists(worker)
        assert isinstance(await checker.check(SELECTOR), Contribution)  # a new worker


async def test_a_check_never_opens_the_global_checkpoint(reported: Layout) -> None:
    """A problem with the global checkpoint (unreadable, locked) is never a selector's."""
    spec = spec_of(reported)
    reported.checkpoint.write_bytes(b"not HDF5 any more")  # after start-up read the plan
    checker = ContributionChecker(reported, spec, timeout=60, workers=1)
    async with checker.running():
        found = await checker.check(SELECTOR)
    assert isinstance(found, Contribution) and found.weight == 5


async def test_a_file_just_written_is_read_once_settled_and_an_older_one_at_once(
    reported: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint changed within SETTLE_SECONDS is not read (its identity could miss a
    rewrite in the same clock tick): its check is run again once it settled; an older
    file is read by the first run, with no wait."""
    aggregate = reported.agg_checkpoint(SELECTOR)
    files = SelectorFiles(reported.root, aggregate.name, reported.agg_weight(SELECTOR).name)
    with monkeypatch.context() as patched:  # in this process: "fresh" for a minute
        patched.setattr(contribution, "SETTLE_SECONDS", 60.0)
        with pytest.raises(NotSettled) as fresh:
            examine(SELECTOR, files, spec_of(reported), settle=False)
        assert 59 < fresh.value.wait <= 60

    runs: list[bool] = []
    run = ContributionChecker._run

    async def counted(self: ContributionChecker, batch: list) -> object:
        runs.extend(request.settle for request in batch)
        return await run(self, batch)

    monkeypatch.setattr(ContributionChecker, "_run", counted)
    checker = ContributionChecker(reported, spec_of(reported), timeout=60, workers=1)
    async with checker.running():
        os.utime(aggregate)  # its last change: now
        found = await checker.check(SELECTOR)
        assert isinstance(found, Contribution)
        assert time.time() >= aggregate.stat().st_ctime + SETTLE_SECONDS  # read once settled
        assert runs in ([False, True], [False])  # [False]: the worker started that late
        await trio.sleep(2 * SETTLE_SECONDS)  # the file ages (not a synchronization)
        runs.clear()
        assert isinstance(await checker.check(SELECTOR), Contribution)
        assert runs == [False]  # read at the first run


def reporting(layout: Layout, keras_weights: list[Path], count: int) -> list[str]:
    """``count`` selectors that reported good files, the n-th (from 0) with weight n + 1."""
    selectors = [f"127.0.0.1:{port}" for port in range(1, count + 1)]
    for number, selector in enumerate(selectors):
        write_aggregate(layout, selector, keras_weights[number % 4], weight=number + 1)
    return selectors


def recorded_batches(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The selectors of each job the checkers run from now on, in order."""
    batches: list[list[str]] = []
    run = ContributionChecker._run

    async def recorded(self: ContributionChecker, batch: list) -> object:
        batches.append([request.selector for request in batch])
        return await run(self, batch)

    monkeypatch.setattr(ContributionChecker, "_run", recorded)
    return batches


def assert_rejected_alone(
    found: dict[str, object], selectors: list[str], hostile: str, reason: str
) -> None:
    """``hostile`` rejected for ``reason``, each other selector (the n-th from 0, see
    :func:`reporting`) accepted with its weight, n + 1."""
    assert found[hostile] == reason
    for number, selector in enumerate(selectors):
        if selector != hostile:
            outcome = found[selector]
            assert isinstance(outcome, Contribution) and outcome.weight == number + 1


async def checked_behind_the_first(
    checker: ContributionChecker, selectors: list[str]
) -> dict[str, object]:
    """Each outcome, the first selector's check held up in the only worker (stopped) until
    the others' checks queued up behind it."""
    found: dict[str, object] = {}

    async def check(selector: str) -> None:
        found[selector] = await checker.check(selector)

    (worker,) = check_workers()
    os.kill(worker, signal.SIGSTOP)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(check, selectors[0])
        await job_sent_to(worker)
        for selector in selectors[1:]:
            nursery.start_soon(check, selector)
        await trio.testing.wait_all_tasks_blocked()
        os.kill(worker, signal.SIGCONT)
    return found


async def test_checks_that_queue_up_while_the_worker_is_busy_share_one_job(
    layout: Layout, keras_weights: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One job per batch of waiting checks: one inter-process round trip, each its answer."""
    selectors = reporting(layout, keras_weights, 5)
    batches = recorded_batches(monkeypatch)
    checker = ContributionChecker(layout, spec_of(layout), timeout=60, workers=1)
    async with checker.running():
        found = await checked_behind_the_first(checker, selectors)
    assert [sorted(batch) for batch in batches] == [selectors[:1], selectors[1:]]
    for number, selector in enumerate(selectors):
        outcome = found[selector]
        assert isinstance(outcome, Contribution)
        assert (outcome.selector, outcome.weight) == (selector, number + 1)
        assert outcome.checkpoint.path == layout.agg_checkpoint(selector)


async def test_checks_that_queue_up_while_several_workers_are_free_are_shared_among_them(
    layout: Layout, keras_weights: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seven checks queued at once with two idle workers: a job of four and one of three,
    run side by side, not one job of seven in one worker while the other idles."""
    selectors = reporting(layout, keras_weights, 7)
    batches = recorded_batches(monkeypatch)
    found: dict[str, object] = {}
    newest = max(layout.agg_checkpoint(selector).stat().st_ctime for selector in selectors)
    await trio.sleep(max(0.0, newest + SETTLE_SECONDS - time.time()))  # each read at once

    async def check(selector: str) -> None:
        found[selector] = await checker.check(selector)

    checker = ContributionChecker(layout, spec_of(layout), timeout=60, workers=2)
    async with checker.running(), trio.open_nursery() as nursery:
        for selector in selectors:  # all queued before the dispatcher runs again
            nursery.start_soon(check, selector)
    assert [len(batch) for batch in batches] == [4, 3]
    assert sorted(batches[0] + batches[1]) == sorted(selectors)
    for number, selector in enumerate(selectors):
        outcome = found[selector]
        assert isinstance(outcome, Contribution) and outcome.weight == number + 1


async def test_a_shared_check_that_hangs_is_split_and_each_file_gets_its_own_deadline(
    layout: Layout, keras_weights: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file whose check makes no progress (its opener is stopped, as an HDF5 call that
    blocks would leave it) holds up the batch it shares until the deadline; then each file
    of that batch is checked alone, with its own deadline: only the hostile one is abandoned."""
    selectors = reporting(layout, keras_weights, 4)
    hostile = selectors[1]
    batches = recorded_batches(monkeypatch)
    timeout = 2.0
    checker = ContributionChecker(layout, spec_of(layout), timeout=timeout, workers=1)
    async with (
        checker.running(),
        fatal_to_open(layout.agg_checkpoint(hostile), signal.SIGSTOP) as stopped,
    ):
        found = await checked_behind_the_first(checker, selectors)
    # The first alone, the three that queued up together and, that job abandoned at its
    # deadline, each of the three alone, in the same order.
    assert [sorted(batch) for batch in batches[:2]] == [selectors[:1], selectors[1:]]
    assert batches[2:] == [[selector] for selector in batches[1]]
    assert_rejected_alone(found, selectors, hostile, (
        f"{layout.selector_dir(hostile)}: the check of these files did not finish within "
        f"{timeout:g} s (CHECK_TIMEOUT); abandoned"
    ))  # fmt: skip
    assert len(stopped.pids) == 2  # in the shared job, then alone
    assert not any(exists(pid) for pid in stopped.pids)  # killed at the deadline, and reaped


def _tiny_chunks(path: Path, shape: tuple[int, int]) -> None:
    """A valid aggregate whose array is in chunks of 4 values: HDF5 needs hundreds of MiB
    of bookkeeping to read 131,072 of them (240 MiB more than a worker's 190, measured), and
    glibc keeps most of it in the process afterwards."""
    path.parent.mkdir(exist_ok=True)
    with h5py.File(path, "w") as file:
        file.create_dataset("layers/big/vars/0", data=np.ones(shape, np.float32), chunks=(1, 4))
    old = time.time() - 10  # settled
    os.utime(path, (old, old))


async def test_every_file_of_a_batch_is_held_to_the_memory_budget_and_bloat_ends_its_worker(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file whose check takes memory up to the budget leaves the worker's heap grown;
    before, the next file's limit was the grown size plus the budget (the second such file
    was accepted after using about 240 MiB, over a budget of 128) and the worker, under
    RETIRE_RSS, kept that memory for the next jobs. Now a job stops at the first file
    after which its worker grew; the rest are checked in a new worker."""
    monkeypatch.setattr(checker_module, "MEMORY_BUDGET", 128 * 2**20)
    shape = (512, 1024)
    with h5py.File(layout.checkpoint, "w") as file:
        file.create_dataset("layers/big/vars/0", data=np.zeros(shape, np.float32))
    selectors = [f"127.0.0.1:{port}" for port in range(1, 6)]
    hostile = selectors[1:3]
    for selector in selectors:
        if selector in hostile:
            _tiny_chunks(layout.agg_checkpoint(selector), shape)
        else:
            layout.selector_dir(selector).mkdir()
            with h5py.File(layout.agg_checkpoint(selector), "w") as file:
                file["layers/big/vars/0"] = np.full(shape, 2.0, np.float32)
        layout.agg_weight(selector).write_text("3\n")
    batches = recorded_batches(monkeypatch)
    checker = ContributionChecker(layout, spec_of(layout), timeout=120, workers=1)
    async with checker.running():
        (first,) = check_workers()
        baseline = vm_size(first)
        found = await checked_behind_the_first(checker, selectors)
        retired = await ended(first)
        # None, if the last file checked was hostile (its worker retires after it; the
        # next job starts another): which it is depends on the order the four queued in.
        left = check_workers()
        for worker in left:  # grown (before: by 220 MiB), it retires once its outcome is sent
            grown = vm_size(worker) - baseline
            assert grown < checker_module.RETIRE_GROWTH or await ended(worker), grown
    for selector in hostile:  # HDF5's or our words for the same MemoryError
        reason = found[selector]
        assert isinstance(reason, str) and reason.startswith(f"{layout.selector_dir(selector)}")
        assert "memory" in reason
    for selector in set(selectors) - set(hostile):
        outcome = found[selector]
        assert isinstance(outcome, Contribution) and outcome.weight == 3
    # The four that queued up share a job, which stops after the first hostile file in it
    # (in whatever order they queued); the files left go, first, to the next job.
    assert sorted(batches[1]) == selectors[1:]
    for batch, following in zip(batches[1:], [*batches[2:], []], strict=True):
        stop = next((at for at, selector in enumerate(batch) if selector in hostile), len(batch))
        assert following == batch[stop + 1 :]
    assert retired  # after the first hostile file
    assert len(left) <= 1


async def test_checks_abandoned_while_their_job_runs_kill_its_worker_and_leave_nothing(
    layout: Layout, keras_weights: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round abandoned (reset, shutdown) while a shared job runs: its worker is killed at
    once (not left to its deadline), the jobs queued behind it never run, its slot is free,
    and the next check is answered by a new worker."""
    selectors = reporting(layout, keras_weights, 5)
    batches = recorded_batches(monkeypatch)
    checker = ContributionChecker(layout, spec_of(layout), timeout=600, workers=1)
    async with checker.running():
        (worker,) = check_workers()
        os.kill(worker, signal.SIGSTOP)  # the job it takes makes no progress
        async with trio.open_nursery() as round_:
            for selector in selectors[:3]:
                round_.start_soon(checker.check, selector)
            await job_sent_to(worker)
            for selector in selectors[3:]:  # queued behind the running job
                round_.start_soon(checker.check, selector)
            await trio.testing.wait_all_tasks_blocked()
            round_.cancel_scope.cancel()
        with trio.fail_after(30):  # bounded, not a sleep: the kill is at once
            while exists(worker):  # noqa: ASYNC110 (no event for another process's end)
                await trio.sleep(0.01)
        found = await checker.check(selectors[4])
        assert isinstance(found, Contribution) and found.weight == 5
        assert checker._slots.value == 1
    # One job ran (the stopped worker's, of some of the first three); those queued behind
    # it never did: the next job is the new check's.
    assert len(batches) == 2 and set(batches[0]) <= set(selectors[:3])
    assert batches[1] == [selectors[4]]


async def test_a_file_that_hangs_holds_up_the_others_of_its_batch_for_batch_seconds_only(
    layout: Layout, keras_weights: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, a batch got a whole CHECK_TIMEOUT: the others that shared a hanging file's
    job waited for it (60 s by default, often past the reporting window, which then drops
    them). Now the batch is split after BATCH_SECONDS; the hanging file alone keeps its
    CHECK_TIMEOUT (here 600 s: only the split can answer the others in time)."""
    selectors = reporting(layout, keras_weights, 4)
    hostile = selectors[-1]  # last in the queue: checked alone after the others
    batches = recorded_batches(monkeypatch)
    checker = ContributionChecker(layout, spec_of(layout), timeout=600, workers=1)
    found: dict[str, object] = {}
    others_answered = trio.Event()

    async def check(selector: str) -> None:
        found[selector] = await checker.check(selector)
        if set(found) == set(selectors) - {hostile}:
            others_answered.set()

    async with (
        checker.running(),
        fatal_to_open(layout.agg_checkpoint(hostile), signal.SIGSTOP) as stopped,
        trio.open_nursery() as nursery,
    ):
        (worker,) = check_workers()
        os.kill(worker, signal.SIGSTOP)
        nursery.start_soon(check, selectors[0])
        await job_sent_to(worker)
        for selector in selectors[1:]:  # queued in this order
            nursery.start_soon(check, selector)
            await trio.testing.wait_all_tasks_blocked()
        os.kill(worker, signal.SIGCONT)
        with trio.fail_after(checker_module.BATCH_SECONDS + 120):  # a bound, far below 600 s
            await others_answered.wait()
        assert hostile not in found  # its check alone is still running (stopped)
        nursery.cancel_scope.cancel()  # the round is abandoned
    assert batches[1:] == [selectors[1:], *([selector] for selector in selectors[1:])]
    for number, selector in enumerate(selectors[:-1]):
        outcome = found[selector]
        assert isinstance(outcome, Contribution) and outcome.weight == number + 1
    assert stopped.pids  # in the shared job (and alone, if it got that far before the end)
    assert not any(exists(pid) for pid in stopped.pids)  # killed with the round, and reaped


TRIED_AGAIN = "the coordinator is out of its own resources"


async def test_a_worker_out_of_descriptors_is_tried_again_and_accepts_once_they_are_freed(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker can open no file (EMFILE): not the files' fault. The check is tried
    again, in the same worker (kept: a new one would need descriptors too), and accepts
    them once descriptors are free; a hostile file that exhausts the check's own memory
    budget is still rejected, alone. Before, EMFILE in a worker rejected the selector
    ("internal error: OSError: [Errno 24] Too many open files"). (Asserted outside the
    checker: a worker that does not end cleanly there hides what its body raised.)"""
    monkeypatch.setattr(checker_module, "MEMORY_BUDGET", 128 * 2**20)
    shape = (512, 1024)
    with h5py.File(layout.checkpoint, "w") as file:
        file.create_dataset("layers/big/vars/0", data=np.zeros(shape, np.float32))
    good, hostile = SELECTOR, "127.0.0.1:2"
    _tiny_chunks(layout.agg_checkpoint(hostile), shape)
    layout.selector_dir(good).mkdir()
    with h5py.File(layout.agg_checkpoint(good), "w") as file:
        file["layers/big/vars/0"] = np.full(shape, 2.0, np.float32)
    for selector in (good, hostile):
        layout.agg_weight(selector).write_text("3\n")
    checker = ContributionChecker(layout, spec_of(layout), timeout=60, workers=1)
    async with checker.running():
        first = await checker.check(good)
        (worker,) = check_workers()
        with (
            out_of_descriptors(worker) as free,
            when_logged(checker_module.__name__, TRIED_AGAIN, free) as said,
        ):
            found = await checker.check(good)
        workers = check_workers()
        rejected = await checker.check(hostile)
    assert isinstance(rejected, str) and rejected.startswith(str(layout.selector_dir(hostile)))
    assert "memory" in rejected and "internal error" not in rejected
    assert isinstance(first, Contribution)
    assert isinstance(found, Contribution) and found.weight == 3
    assert said.seen == 1
    assert workers == [worker]


async def test_a_check_that_cannot_run_for_its_timeout_is_out_of_resources_not_a_rejection(
    reported: Layout, mock_clock: trio.testing.MockClock
) -> None:
    """Out of descriptors until CHECK_TIMEOUT has passed (the clock jumps there as the
    check first says it will try again): OutOfResources, which says what ran out and what
    to raise, instead of a rejection of the selector; the next check, descriptors freed,
    accepts its files."""
    mock_clock.rate = 1.0  # the checks' own waits as on the real clock
    timeout = 60.0
    checker = ContributionChecker(reported, spec_of(reported), timeout=timeout, workers=1)
    outcomes: list[object] = []
    async with checker.running():
        outcomes.append(await checker.check(SELECTOR))  # a worker is up
        (worker,) = check_workers()
        with (
            out_of_descriptors(worker),
            when_logged(checker_module.__name__, TRIED_AGAIN, lambda: mock_clock.jump(timeout)),
        ):
            try:
                outcomes.append(await checker.check(SELECTOR))
            except OutOfResources as error:
                outcomes.append(error)
        workers = check_workers()
        outcomes.append(await checker.check(SELECTOR))
    first, failed, after = outcomes
    assert isinstance(first, Contribution) and isinstance(after, Contribution)
    assert isinstance(failed, OutOfResources), failed
    assert str(failed) == (
        f"{reported.selector_dir(SELECTOR)}: these files could not be checked: the "
        "coordinator ran out of its own resources ([Errno 24] Too many open files) and "
        "still had none after trying again for 60 s (CHECK_TIMEOUT); not the selector's "
        "fault: raise the coordinator's RLIMIT_NOFILE (ulimit -n) or memory, or lower "
        "CHECK_WORKERS"
    )
    assert workers == [worker]


async def test_a_worker_the_coordinator_cannot_start_is_tried_again_not_a_rejection(
    reported: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    """The coordinator itself is out of descriptors when a check needs a new worker (its
    last one was killed): trio-parallel's pipes cannot be made (OSError EMFILE on our
    side). Warming the workers up then logs, and does not raise; the check is tried again
    and accepts the files once descriptors are free. Before, it rejected the selector
    ("internal error: OSError: [Errno 24] Too many open files")."""
    checker = ContributionChecker(reported, spec_of(reported), timeout=60, workers=1)
    async with checker.running():
        (worker,) = check_workers()
        os.kill(worker, signal.SIGKILL)
        while exists(worker):  # noqa: ASYNC110 (no event for another process's end)
            await trio.sleep(0.01)
        with out_of_descriptors() as free:
            await checker.warm()
            with when_logged(checker_module.__name__, TRIED_AGAIN, free) as said:
                found = await checker.check(SELECTOR)
        workers = check_workers()
    assert isinstance(found, Contribution) and found.weight == 5
    assert said.seen == 1
    assert len(workers) == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "a worker process to check selectors' files failed to start ([Errno 24] Too many "
        "open files)"
    ]


@needs_fuse
@pytest.mark.fuse
@pytest.mark.parametrize(
    ("operation", "code"),
    [("open", errno.EMFILE), ("read", errno.ENFILE), ("getattr", errno.ENOBUFS)],
)
async def test_a_selector_file_system_that_says_too_many_open_files_is_rejected_alone(
    reported: Layout, tmp_path: Path, mock_clock: trio.testing.MockClock, operation: str, code: int
) -> None:
    """The selector's folder is its own file system (FUSE), whose server answers EMFILE,
    ENFILE or ENOBUFS to an open, a read or a stat of the selector's file, while the
    coordinator has descriptors to spare: the selector is rejected at once, saying what
    its file system answered, and the check is never tried again. Before, it was taken
    for the coordinator's own shortage: tried again for CHECK_TIMEOUT, then
    OutOfResources, which fails the round for everyone, every round."""
    mock_clock.rate = 1.0  # the checks' own waits as on the real clock
    timeout = 60.0
    backing = tmp_path / "served"
    reported.selector_dir(SELECTOR).rename(backing)
    checker = ContributionChecker(reported, spec_of(reported), timeout=timeout, workers=1)
    with mounted(
        backing, reported.selector_dir(SELECTOR), reported.agg_weight_name, operation, code
    ):
        async with checker.running():
            with when_logged(
                checker_module.__name__, TRIED_AGAIN, lambda: mock_clock.jump(timeout)
            ) as said:
                try:
                    outcome: object = await checker.check(SELECTOR)
                except OutOfResources as error:
                    outcome = error
    assert isinstance(outcome, str), outcome
    assert outcome.startswith(str(reported.selector_dir(SELECTOR)))
    assert f"{os.strerror(code)}, said" in outcome
    assert "internal error" not in outcome
    assert said.seen == 0


def test_an_emfile_with_a_file_name_is_the_checks_own_only_when_confirmed() -> None:
    """An OSError EMFILE naming a selector's file that no confirming open raised (what a
    new open path that forgot to confirm would let out, or its file system's answer)
    rejects the selector; only :class:`OwnShortage` (raised by untrusted.py's opens once
    the process itself could open nothing: tests/storage/test_untrusted.py, with a real
    shortage) is the check's own, tried again. Before, any EMFILE carrying a file name was
    taken as confirmed: the round failed for everyone after CHECK_TIMEOUT."""
    folder = Path("/fl/127.0.0.1:1")
    said = OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(folder / "fl_agg_checkpoint"))
    assert checker_module._ours_or_the_files(said, folder) == (
        f"{folder}: these files cannot be read ([Errno 24] Too many open files, said their "
        "file system; the check was not short of any): not the coordinator's fault; check "
        "the storage that serves this folder"
    )
    assert checker_module._ours_or_the_files(OwnShortage.of(said), folder) == (
        checker_module._Ours("[Errno 24] Too many open files")
    )


@needs_fuse
@pytest.mark.fuse
@pytest.mark.parametrize("code", [errno.EIO, errno.ESTALE])
@pytest.mark.parametrize("file", ["weight", "checkpoint"])
async def test_a_selector_file_system_failing_any_call_of_the_check_rejects_it_alone(
    reported: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture, file: str, code: int
) -> None:
    """The selector's folder is its own file system (FUSE), whose server answers EIO (or
    ESTALE) to every open, read or stat of one of its files from the N-th on, for every N
    until the check no longer reaches it (then it accepts the files: the calls were all
    tried). Each is a rejection of the selector naming its folder, what its file system
    said and what to do, and nothing is logged as an error. Before, a failed read of the
    weight file and a failed ``fstat`` of the open checkpoint (as it settles, and after
    its values were read) came out as "internal error: OSError: [Errno 5] Input/output
    error", its traceback logged."""
    name = reported.agg_weight_name if file == "weight" else reported.agg_checkpoint_name
    folder = reported.selector_dir(SELECTOR)
    backing = tmp_path / "served"
    folder.rename(backing)
    os.utime(backing / reported.agg_checkpoint_name, (1, 1))  # settled: no second check
    checker = ContributionChecker(reported, spec_of(reported), timeout=60, workers=1)
    rejected: dict[str, list[str]] = {}
    async with checker.running():
        with mounted(backing, folder, name, "open", code) as mount:
            for operation in ("open", "read", "getattr"):
                for after in range(1, 100):  # until a check makes fewer such calls
                    await trio.to_thread.run_sync(mount.arm, operation, code, after)
                    outcome = await checker.check(SELECTOR)
                    if isinstance(outcome, Contribution):
                        break
                    rejected.setdefault(operation, []).append(outcome)
    assert sorted(rejected) == ["getattr", "open", "read"]
    for outcome in (outcome for outcomes in rejected.values() for outcome in outcomes):
        assert outcome.startswith(f"{folder}/{name}: ") or outcome.startswith(f"{folder}: ")
        assert os.strerror(code) in outcome
        assert "internal error" not in outcome
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@needs_fuse
@pytest.mark.fuse
@pytest.mark.parametrize("code", [errno.EIO, errno.EMFILE])
async def test_a_selector_file_system_failing_close_rejects_nothing(
    reported: Layout, tmp_path: Path, code: int
) -> None:
    """The selector's file system (FUSE) answers EIO (or EMFILE) to every close (flush)
    of its weight file, or of its aggregate: the check accepts the files (weight 5, as
    on a plain folder), since what was read through the descriptor was whole. Before:
    rejected, "these files cannot be read", for a close of a file read to the end."""
    folder = reported.selector_dir(SELECTOR)
    backing = tmp_path / "served"
    folder.rename(backing)
    os.utime(backing / reported.agg_checkpoint_name, (1, 1))  # settled: no second check
    checker = ContributionChecker(reported, spec_of(reported), timeout=60, workers=1)
    weights = []
    async with checker.running():
        for name in (reported.agg_weight_name, reported.agg_checkpoint_name):
            with mounted(backing, folder, name, "flush", code):
                outcome = await checker.check(SELECTOR)
            assert isinstance(outcome, Contribution), outcome
            weights.append(outcome.weight)
    assert weights == [5, 5]


async def test_while_out_of_descriptors_the_checks_say_so_once_a_minute_with_a_count(
    layout: Layout,
    keras_weights: list[Path],
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Five reports checked while the worker really is out of descriptors (its
    RLIMIT_NOFILE lowered): each check is tried again, and each ends in OutOfResources
    (the clock jumps past CHECK_TIMEOUT whenever one says it tries again). One WARNING
    says why; the four other checks' are counted, and the count written once (as the
    checker stops, within the minute). Before: one WARNING per report, so a coordinator
    short of descriptors wrote one per report per round."""
    mock_clock.rate = 1.0  # the checks' own waits as on the real clock
    timeout = 60.0
    selectors = [f"127.0.0.1:{port}" for port in range(1, 6)]
    for selector in selectors:
        write_aggregate(layout, selector, keras_weights[0], weight=5)
    caplog.set_level(logging.DEBUG, checker_module.__name__)
    checker = ContributionChecker(layout, spec_of(layout), timeout=timeout, workers=1)
    failed: list[str] = []

    def jump() -> None:  # each time one says it tries again (a DEBUG line after the first)
        mock_clock.jump(timeout)

    async with checker.running():
        assert isinstance(await checker.check(selectors[0]), Contribution)  # a worker is up
        (worker,) = check_workers()
        with (
            out_of_descriptors(worker),
            when_logged(checker_module.__name__, TRIED_AGAIN, jump, every=True) as said,
        ):
            for selector in selectors:
                with pytest.raises(OutOfResources) as raised:
                    await checker.check(selector)
                failed.append(str(raised.value))
    lines = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == checker_module.__name__ and r.levelno >= logging.INFO
    ]
    assert [text.split(": these files")[0] for text in failed] == [
        str(layout.selector_dir(selector)) for selector in selectors
    ]
    assert said.seen == 5  # every check tried again once, each said so at DEBUG at least
    first = (
        f"the check of {selectors[0]}'s files cannot run: the coordinator is out of its own "
        "resources ([Errno 24] Too many open files); tried again for up to "
    )
    assert [level for level, _ in lines] == ["WARNING", "WARNING"], lines
    assert lines[0][1].startswith(first), lines
    assert lines[1][1] == (
        "... and 4 more in the last 60 s: checks tried again ([Errno 24] Too many open files)"
    )


@pytest.mark.parametrize("sent", [signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS])
async def test_a_worker_that_crashes_on_a_file_in_a_shared_check_rejects_that_file_alone(
    layout: Layout, keras_weights: list[Path], sent: signal.Signals
) -> None:
    """A file whose reading crashes its worker (a segfault, an ``abort()`` in HDF5, a bus
    error: the worker gets that signal as it opens the file) in a job it shares with two
    good files: the job ends as a whole (trio-parallel's BrokenWorkerError, not an
    OSError, which would be taken for the coordinator's own shortage and retried until
    the round fails), each file is checked again alone, and only the hostile one is
    rejected, with the signal its worker died of."""
    selectors = reporting(layout, keras_weights, 3)
    hostile = selectors[1]
    checker = ContributionChecker(layout, spec_of(layout), timeout=60, workers=1)
    async with (
        checker.running(),
        fatal_to_open(layout.agg_checkpoint(hostile), sent) as crashed,
    ):
        found = await checked_behind_the_first(checker, selectors)
    assert_rejected_alone(found, selectors, hostile, (
        f"{layout.selector_dir(hostile)}: checking these files ended its worker process "
        f"(exit {-sent})"
    ))  # fmt: skip
    assert len(crashed.pids) == 2  # in the shared job, then alone
