"""Issue 11's attack table against a running coordinator: a selector's folder is untrusted.

Each row puts something hostile in one selector's folder (``bad``) while
another selector (``good``) reports a real Keras aggregate. Whatever the
row, the round must end by itself with ``bad`` rejected for a reason a
person understands, the new global checkpoint must be byte-for-byte the
FedAvg of ``good`` alone (no outside byte in it), the health check must
answer within 2 s meanwhile, memory must stay bounded and every worker
thread and process must be given back.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import trio
import trio.testing
from helpers.fatal_file import fatal_to_open
from helpers.peers import (
    FakeSelector,
    PurerpcClient,
    assert_arrays_close,
    completed,
    fedavg,
    read_floats,
    serve_and_watch,
    watch,
    write_aggregate,
)
from helpers.resources import (
    check_workers,
    exists,
    health_now,
    job_sent_to,
    peak_rss,
    reset_peak,
    thread_slots_in_use,
)
from helpers.selector_fs import HANG, Mount, mounted, needs_fuse

from fl_coordinator.config import Settings
from fl_coordinator.federation.processes import Child
from fl_coordinator.storage.aggregation import Contribution, aggregate
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.pass_control import given_up
from fl_coordinator.storage.untrusted import REASON_MAX_CHARS, UntrustedFile

MARKER = 1234.5  # every float of the files outside the root
WINDOW = 30.0  # REPORTING_TIMEOUT: every round here must end well before it
#: Growth of this process's resident memory during a round: a round of the
#: built-in model costs 0 to 5 MB here; the rows' files used to cost 1 to 10 GB.
MEMORY_BOUND = 32 * 2**20
#: Resident peak of a check worker: about 40 MB with numpy and h5py, whatever it read.
WORKER_BOUND = 128 * 2**20
KERNEL = "layers/dense/vars/0"
BIAS = "layers/dense/vars/1"  # shape (32,), float32


def contents(path: Path) -> dict[str, tuple[str, bytes]]:
    """Every object of an HDF5 file: each dataset's dtype, shape and raw bytes, each attribute.

    (The file's own bytes also hold the time each group was written, so two
    runs of the same aggregation differ there and nowhere else.)
    """
    found: dict[str, tuple[str, bytes]] = {}
    with h5py.File(path, "r") as file:

        def visit(name: str, obj: h5py.HLObject) -> None:
            attributes = repr(sorted((key, repr(obj.attrs[key])) for key in obj.attrs))
            if isinstance(obj, h5py.Dataset):
                value = np.asarray(obj[()])
                found[name] = (f"{value.dtype} {value.shape} {attributes}", value.tobytes())
            else:
                found[name] = (attributes, b"")

        file.visititems(visit)
    return found


def marked_copy(source: Path, dest: Path) -> Path:
    """``source``'s layout with every float set to MARKER: a file outside the root."""
    shutil.copyfile(source, dest)
    with h5py.File(dest, "a") as file:
        for name in list(read_floats(dest)):
            file[name][...] = MARKER
    return dest


class Outside:
    """Files of the coordinator's machine outside ``FL_ROOT_PATH`` that a selector points at."""

    def __init__(self, folder: Path, like: Path) -> None:
        folder.mkdir()
        self.folder = folder
        self.model = marked_copy(like, folder / "fl_agg_checkpoint")
        (folder / "fl_agg_checkpoint_weight").write_text("7\n")
        self.fifo = folder / "pipe"
        os.mkfifo(self.fifo)


def _relink(path: Path, dataset: str, link: object) -> None:
    with h5py.File(path, "a") as file:
        del file[dataset]
        file[dataset] = link


def gzip_bomb_stream(size: int, block: int = 2**20) -> bytes:
    """A zlib stream of ``size`` zero bytes (about 1000:1), built without compressing them all.

    After a full flush the compressor starts afresh, so compressing the same
    block again gives the same bytes: the stream is that block repeated. The
    Adler-32 of n zeros is (n mod 65521) << 16 | 1.
    """
    compressor = zlib.compressobj(9)
    zeros = bytes(block)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.flush()[:-4] + struct.pack(">I", (size % 65521) << 16 | 1)
    return first + again * (size // block - 1) + end


# -- the rows: each changes one file (or the folder) of the bad selector ------------------


def fifo(path: Path, outside: Outside | None = None) -> None:
    path.unlink()
    os.mkfifo(path)


def external_link_to_fifo(path: Path, outside: Outside) -> None:
    _relink(path, KERNEL, h5py.ExternalLink(str(outside.fifo), "/x"))


def external_link_outside(path: Path, outside: Outside) -> None:
    _relink(path, KERNEL, h5py.ExternalLink(str(outside.model), KERNEL))


def virtual_outside(path: Path, outside: Outside) -> None:
    layout = h5py.VirtualLayout(shape=(32,), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(outside.model), BIAS, shape=(32,))
    with h5py.File(path, "a") as file:
        del file[BIAS]
        file.create_virtual_dataset(BIAS, layout)


def external_storage(path: Path, outside: Outside) -> None:
    with h5py.File(path, "a") as file:
        del file[BIAS]
        file.create_dataset(BIAS, shape=(32,), dtype=np.float32,
                            external=[("/etc/passwd", 0, 128)])  # fmt: skip


def link_to_outside(path: Path, outside: Outside) -> None:
    path.unlink()
    path.symlink_to(outside.model)


def folder_links_outside(folder: Path, outside: Outside) -> None:
    shutil.rmtree(folder)
    folder.symlink_to(outside.folder)


def link_to(device: str):
    def attack(path: Path, outside: Outside) -> None:
        path.unlink()
        path.symlink_to(device)

    return attack


def sparse(path: Path, outside: Outside) -> None:
    with open(path, "wb") as file:
        file.truncate(2 * 2**30)


def gzip_bomb(path: Path, outside: Outside) -> None:
    """The issue's row: shape (32,) but maxshape (None,) and one gzip chunk of 2**28 float32."""
    with h5py.File(path, "a") as file:
        del file[BIAS]
        bomb = file.create_dataset(BIAS, shape=(32,), maxshape=(None,), dtype=np.float32,
                                   chunks=(2**28,), compression="gzip")  # fmt: skip
        bomb.id.write_direct_chunk((0,), gzip_bomb_stream(2**30))


def nines(count: int):
    return lambda path, outside: path.write_text("9" * count)


PASSWD = Path("/etc/passwd").read_bytes()[:128]
LINK = "is a symbolic link (links are not followed)"
ROWS = {  # row: (the file attacked, the attack, what the rejection must say)
    "aggregate is a FIFO": ("aggregate", fifo, "is a FIFO (named pipe), not a regular file"),
    "external link to a FIFO": ("aggregate", external_link_to_fifo,
                                f"'{KERNEL}' is an external link to '/x' in '"),
    "external link outside the root": ("aggregate", external_link_outside,
                                       "(links out of the file are refused)"),
    "virtual dataset outside the root": ("aggregate", virtual_outside,
                                         "is a virtual dataset (VDS)"),
    "external storage /etc/passwd": (
        "aggregate", external_storage,
        "stores its values in other files ('/etc/passwd', ...: external storage)",
    ),
    "aggregate links outside": ("aggregate", link_to_outside, LINK),
    "folder links outside": ("folder", folder_links_outside, f"{LINK}, not a folder"),
    "weight links to /dev/zero": ("weight", link_to("/dev/zero"), LINK),
    "weight links to /dev/urandom": ("weight", link_to("/dev/urandom"), LINK),
    "weight is a 2 GB sparse file": ("weight", sparse,
                                     "weight file is 2147483648 bytes; at most 64 are expected"),
    "weight is a FIFO": ("weight", fifo, "is a FIFO (named pipe), not a regular file"),
    "gzip bomb in a huge chunk": ("aggregate", gzip_bomb,
                                  f"dataset '{BIAS}' is stored with filter 'deflate' (id 1)"),
    "weight of 5000 nines": ("weight", nines(5000),
                             "weight file is 5000 bytes; at most 64 are expected"),
    "weight of 400 nines": ("weight", nines(400),
                            "weight file is 400 bytes; at most 64 are expected"),
    "weight of 30 nines": ("weight", nines(30), "weight of 30 digits is absurdly large"),
}  # fmt: skip


async def configured(client: PurerpcClient, *selectors: FakeSelector) -> None:
    """Each selector checks in one client; the goal is reached and each is told."""
    for selector in selectors:
        assert await client.check_in(selector.id) is True
    for selector in selectors:
        await selector.told.receive()


def expected_checkpoint(layout: Layout, good: Path, weight: int, replay: Path) -> Path:
    """What the checkpoint must become: the same aggregation over the good selector alone."""
    replay.mkdir()
    shutil.copyfile(layout.checkpoint, replay / "fl_checkpoint")
    shutil.copyfile(good, replay / "good")
    aggregate(replay / "fl_checkpoint", [Contribution("g", UntrustedFile(replay, "good"), weight)],
              replay / "tmp")  # fmt: skip
    return replay / "fl_checkpoint"


@pytest.mark.parametrize("row", list(ROWS))
async def test_attack_row(
    settings: Settings,
    layout: Layout,
    keras_weights: list[Path],
    nursery: trio.Nursery,
    tmp_path: Path,
    row: str,
) -> None:
    outside = Outside(tmp_path / "outside", keras_weights[0])
    which, attack, reason = ROWS[row]
    endpoints, watcher, client = await serve_and_watch(
        nursery, settings.replace(reporting_timeout=WINDOW, min_reporting_fraction=0.5)
    )
    good, bad = await FakeSelector().start(nursery), await FakeSelector().start(nursery)
    before = read_floats(layout.checkpoint)
    expected = expected_checkpoint(layout, keras_weights[1], 2, tmp_path / "replay")
    await configured(client, good, bad)
    write_aggregate(layout, good.id, keras_weights[1], weight=2)
    write_aggregate(layout, bad.id, keras_weights[2], weight=3)
    target = {"aggregate": layout.agg_checkpoint(bad.id), "weight": layout.agg_weight(bad.id),
              "folder": layout.selector_dir(bad.id)}[which]  # fmt: skip
    attack(target, outside)
    baseline = reset_peak()
    started = trio.current_time()

    await client.report(bad.id)
    assert await health_now(endpoints.grpc_port) == "SERVING"  # within 2 s, while checking
    await client.report(good.id)
    with trio.fail_after(WINDOW):
        done = await watcher.wait_for(completed(1))

    assert trio.current_time() - started < WINDOW  # ended by itself, not by the window
    assert watcher.stages()[:4] == [(1, "SELECTION"), (1, "CONFIGURATION"), (1, "REPORTING"),
                                    (1, "COMPLETED")]  # fmt: skip
    assert (done["reported"], list(done["rejected"])) == ([good.id], [bad.id])
    why = done["rejected"][bad.id]
    assert reason in why and len(why) <= REASON_MAX_CHARS
    assert why.startswith(str(layout.selector_dir(bad.id)))
    assert "9" * 50 not in why
    # The new checkpoint: byte for byte the FedAvg of the good selector alone.
    assert contents(layout.checkpoint) == contents(expected)
    assert_arrays_close(read_floats(layout.checkpoint), fedavg(before, [(keras_weights[1], 2)]))
    assert PASSWD not in layout.checkpoint.read_bytes()
    assert all(np.abs(a).max() < 100 for a in read_floats(layout.checkpoint).values())  # no MARKER
    # Bounded memory, and every thread slot and worker process given back.
    assert peak_rss() - baseline < MEMORY_BOUND
    workers = check_workers()
    assert 1 <= len(workers) <= settings.check_workers
    assert all(peak_rss(pid) < WORKER_BOUND for pid in workers)
    assert await thread_slots_in_use() == 0


async def test_forty_selectors_with_a_fifo_for_weight_leak_nothing(
    settings: Settings, layout: Layout, keras_weights: list[Path], nursery: trio.Nursery
) -> None:
    """Each used to leak a worker thread; 40 took all of trio's and stopped the coordinator."""
    hostile = 40
    _, watcher, client = await serve_and_watch(
        nursery,
        settings.replace(checkin_limit=hostile + 1, min_reporting_fraction=1 / (hostile + 1),
                         reporting_timeout=WINDOW),
    )  # fmt: skip
    selectors = [await FakeSelector().start(nursery) for _ in range(hostile + 1)]
    good, bad = selectors[0], selectors[1:]
    for selector in selectors:
        assert await client.check_in(selector.id) is True
    for selector in selectors:
        await selector.told.receive()
        write_aggregate(layout, selector.id, keras_weights[1], weight=2)
    for selector in bad:
        fifo(layout.agg_weight(selector.id))
    async with trio.open_nursery() as reports:
        for selector in selectors:
            reports.start_soon(client.report, selector.id)
    with trio.fail_after(WINDOW):
        done = await watcher.wait_for(completed(1))
    assert (done["stage"], done["reported"]) == ("COMPLETED", [good.id])
    assert sorted(done["rejected"]) == sorted(s.id for s in bad)
    assert all("is a FIFO (named pipe)" in why for why in done["rejected"].values())
    assert await thread_slots_in_use() == 0
    assert len(check_workers()) <= settings.check_workers

    # And the next round is served as usual.
    for selector in selectors:
        assert await client.check_in(selector.id) is True
    for selector in selectors:
        await selector.told.receive()
        layout.agg_weight(selector.id).unlink()  # the FIFOs are gone: all good now
        write_aggregate(layout, selector.id, keras_weights[2], weight=1)
    async with trio.open_nursery() as reports:
        for selector in selectors:
            reports.start_soon(client.report, selector.id)
    with trio.fail_after(WINDOW):
        done = await watcher.wait_for(completed(2))
    assert (done["stage"], len(done["reported"]), done["rejected"]) == ("COMPLETED", 41, {})


async def test_a_file_replaced_after_its_check_is_not_averaged(
    settings: Settings,
    layout: Layout,
    keras_weights: list[Path],
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """Checked, then swapped for a file from outside: the aggregation sees it and drops it."""
    outside = Outside(tmp_path / "outside", keras_weights[0])
    _, watcher, client = await serve_and_watch(
        nursery, settings.replace(reporting_timeout=WINDOW, min_reporting_fraction=0.5)
    )
    swapped, good = await FakeSelector().start(nursery), await FakeSelector().start(nursery)
    expected = expected_checkpoint(layout, keras_weights[1], 2, tmp_path / "replay")
    await configured(client, swapped, good)
    write_aggregate(layout, swapped.id, keras_weights[2], weight=3)
    write_aggregate(layout, good.id, keras_weights[1], weight=2)
    await client.report(swapped.id)
    await watcher.wait_for(lambda m: m["reported"] == [swapped.id])  # it passed its check
    staged = layout.selector_dir(swapped.id) / "next"
    shutil.copyfile(outside.model, staged)
    os.replace(staged, layout.agg_checkpoint(swapped.id))  # the same name, another file
    await client.report(good.id)
    with trio.fail_after(WINDOW):
        done = await watcher.wait_for(completed(1))
    assert (done["stage"], done["reported"]) == ("COMPLETED", [good.id])
    assert done["rejected"] == {
        swapped.id: f"{layout.agg_checkpoint(swapped.id)}: aggregate checkpoint changed after "
        "it was checked"
    }
    assert contents(layout.checkpoint) == contents(expected)


@dataclass
class _Hung:
    """Two selectors told and reported: ``hung``'s files passed their check through
    ``gate``'s FUSE ``mount``, which answers no read of ``file`` since; then ``good``'s."""

    hung: FakeSelector
    good: FakeSelector
    file: Path
    gate: Path
    mount: Mount


@contextlib.asynccontextmanager
async def _hung_after_its_check(
    nursery: trio.Nursery,
    client: PurerpcClient,
    watcher: Any,
    layout: Layout,
    keras_weights: list[Path],
    tmp_path: Path,
    chunked: bool = False,
) -> AsyncIterator[_Hung]:
    """See :class:`_Hung` (``chunked``: its aggregate stored in chunks). Unmounted at the
    end, its storage answering first."""
    hung, good = await FakeSelector().start(nursery), await FakeSelector().start(nursery)
    await configured(client, hung, good)
    write_aggregate(layout, hung.id, keras_weights[2], weight=3)
    if chunked:
        _in_chunks(layout.agg_checkpoint(hung.id))
    write_aggregate(layout, good.id, keras_weights[1], weight=2)
    folder, file, gate = (
        layout.selector_dir(hung.id),
        layout.agg_checkpoint(hung.id),
        tmp_path / "hang",
    )
    shutil.move(folder, tmp_path / "served")
    with mounted(tmp_path / "served", folder, file.name, "read", HANG, gate=gate) as mount:
        await client.report(hung.id)
        with trio.fail_after(WINDOW):
            await watcher.wait_for(lambda m: m["reported"] == [hung.id])  # checked through it
        gate.touch()
        await client.report(good.id)
        yield _Hung(hung, good, file, gate, mount)


def _in_chunks(path: Path) -> None:
    """Rewrite an aggregate with its arrays in chunks (the aggregation then opens it as HDF5)."""
    with h5py.File(path, "r") as old, h5py.File(path.with_suffix(".new"), "w") as new:

        def copy(name: str, obj: h5py.HLObject) -> None:
            if isinstance(obj, h5py.Dataset):
                new.create_dataset(name, data=obj[()], chunks=True if obj.ndim else None)

        old.visititems(copy)
    os.replace(path.with_suffix(".new"), path)


@needs_fuse
@pytest.mark.fuse
async def test_a_selector_whose_storage_hangs_while_it_is_averaged_is_refused_alone(
    settings: Settings,
    layout: Layout,
    keras_weights: list[Path],
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """Its files passed their check; then its storage answers no read (a hung mount). At
    CHECK_TIMEOUT the pass is given up, that selector refused and the other averaged again,
    while the coordinator answers; the pass given up, freed when the storage answers at
    last, publishes nothing and leaves nothing."""
    timeout = 2.0
    endpoints, watcher, client = await serve_and_watch(
        nursery,
        settings.replace(check_timeout=timeout, reporting_timeout=WINDOW,
                         min_reporting_fraction=0.5),
    )  # fmt: skip
    expected = expected_checkpoint(layout, keras_weights[1], 2, tmp_path / "replay")
    async with _hung_after_its_check(
        nursery, client, watcher, layout, keras_weights, tmp_path
    ) as hung:
        with trio.fail_after(WINDOW):  # both checked: the pass, stuck for 2 s, is next
            await watcher.wait_for(lambda m: len(m["reported"]) == 2)
        assert await health_now(endpoints.grpc_port) == "SERVING"
        with trio.fail_after(WINDOW):
            done = await watcher.wait_for(completed(1))
        assert (done["stage"], done["reported"]) == ("COMPLETED", [hung.good.id])
        assert done["rejected"] == {
            hung.hung.id: f"{hung.file}: its storage did not answer within {timeout:g} s "
            "(CHECK_TIMEOUT) while it was being averaged; abandoned (check the storage that "
            "serves this folder)"
        }
        assert contents(layout.checkpoint) == contents(expected)
        (stuck,) = given_up()
        assert stuck.stuck is not None and stuck.stuck.path == hung.file
        hung.gate.unlink()  # the storage answers at last
        assert await trio.to_thread.run_sync(stuck.finished.wait, WINDOW)
    assert given_up() == []
    assert contents(layout.checkpoint) == contents(expected)
    assert [p for p in layout.tmp.iterdir() if p.name.startswith(".fl_checkpoint")] == []


@needs_fuse
@pytest.mark.fuse
async def test_a_pass_stuck_inside_hdf5_fails_the_next_one_at_once_with_what_to_do(
    settings: Settings,
    layout: Layout,
    keras_weights: list[Path],
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """The hung selector's aggregate is stored in chunks: the pass reads it through HDF5,
    whose one lock the stuck read then holds. The selector is refused; averaging the
    others again cannot open any file meanwhile: the round fails at once, saying why and
    what to do, the checkpoint kept (it would have waited for ever)."""
    _, watcher, client = await serve_and_watch(
        nursery,
        settings.replace(check_timeout=2.0, reporting_timeout=WINDOW, min_reporting_fraction=0.5),
    )
    before = layout.checkpoint.read_bytes()  # not through h5py: its lock is held below
    async with _hung_after_its_check(
        nursery, client, watcher, layout, keras_weights, tmp_path, chunked=True
    ) as hung:
        with trio.fail_after(WINDOW):
            done = await watcher.wait_for(lambda m: m["stage"] == "FAILED")
        assert list(done["rejected"]) == [hung.hung.id]
        assert re.fullmatch(
            re.escape(
                f"an earlier averaging pass is still waiting on {hung.file}, inside HDF5, for "
            )
            + r"\d+"
            + re.escape(
                " s: HDF5 serves one call at a time in this process, so nothing can be averaged "
                "until that storage answers; abort its mount (FUSE: stop its server, or write 1 "
                "to /sys/fs/fuse/connections/N/abort; NFS: umount -f): umount -l does not end a "
                "call in flight, nor can any process end while it waits on FUSE; the global "
                "checkpoint is kept as it was"
            ),
            done["error"],
        ), done["error"]
        assert layout.checkpoint.read_bytes() == before
        (stuck,) = given_up()
        with _fuse_connections() as connections:  # what it says to do, its server still hung
            minor = os.minor(os.stat(hung.file.parent).st_dev)
            (connections / str(minor) / "abort").write_text("1")
            assert await trio.to_thread.run_sync(stuck.finished.wait, WINDOW)
        assert hung.gate.exists()
    assert given_up() == []


@contextlib.contextmanager
def _fuse_connections() -> Iterator[Path]:
    """The FUSE control file system (fusectl), mounted for the test where it is not."""
    connections = Path("/sys/fs/fuse/connections")
    mounted_here = not os.path.ismount(connections)
    if mounted_here:
        subprocess.run(["mount", "-t", "fusectl", "none", str(connections)], check=True)
    try:
        yield connections
    finally:
        if mounted_here:
            subprocess.run(["umount", str(connections)], check=True)


async def test_a_check_that_hangs_is_killed_and_does_not_hold_up_the_others(
    settings: Settings, layout: Layout, keras_weights: list[Path], nursery: trio.Nursery
) -> None:
    """A check that makes no progress (its worker is stopped, as an HDF5 call that blocks
    would leave it) is killed at CHECK_TIMEOUT; the selector queued behind it is checked."""
    timeout = 2.0
    endpoints, watcher, client = await serve_and_watch(
        nursery,
        settings.replace(check_workers=1, check_timeout=timeout, reporting_timeout=WINDOW,
                         min_reporting_fraction=0.5),
    )  # fmt: skip
    hung, good = await FakeSelector().start(nursery), await FakeSelector().start(nursery)
    for round_number in (1, 2):
        await configured(client, hung, good)
        for selector in (hung, good):
            write_aggregate(layout, selector.id, keras_weights[round_number], weight=2)
        if round_number == 2:
            (stopped,) = check_workers()  # round 1's worker, idle
            os.kill(stopped, signal.SIGSTOP)
            started = trio.current_time()
        await client.report(hung.id)
        if round_number == 2:
            await job_sent_to(stopped)  # the hung selector's check got the stopped worker
        await client.report(good.id)
        if round_number == 2:
            assert await health_now(endpoints.grpc_port) == "SERVING"  # while it hangs
            assert await client.check_in(hung.id) is False  # check-ins are answered too
        with trio.fail_after(WINDOW):
            done = await watcher.wait_for(completed(round_number))
    assert timeout <= trio.current_time() - started < WINDOW
    assert (done["stage"], done["reported"]) == ("COMPLETED", [good.id])
    assert done["rejected"] == {
        hung.id: f"{layout.selector_dir(hung.id)}: the check of these files did not finish "
        f"within {timeout:g} s (CHECK_TIMEOUT); abandoned"
    }
    assert not exists(stopped)  # killed and reaped
    assert len(check_workers()) == 1
    assert await thread_slots_in_use() == 0


async def test_a_file_that_ends_its_worker_in_a_shared_check_rejects_only_its_selector(
    settings: Settings,
    layout: Layout,
    keras_weights: list[Path],
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Reports that queue up while the worker is busy are checked in one job. A file whose
    opening ends its worker (as a file that crashes HDF5 would) fails that job as a whole;
    each of its files is then checked again alone: only the hostile selector is refused,
    the three good ones are averaged."""
    _, watcher, client = await serve_and_watch(
        nursery,
        settings.replace(check_workers=1, checkin_limit=4, min_reporting_fraction=0.5,
                         reporting_timeout=WINDOW),
    )  # fmt: skip
    selectors = [await FakeSelector().start(nursery) for _ in range(4)]
    first, hostile, *others = selectors
    await configured(client, *selectors)
    before = read_floats(layout.checkpoint)
    good = {first.id: (keras_weights[1], 1), others[0].id: (keras_weights[2], 2),
            others[1].id: (keras_weights[3], 3)}  # fmt: skip
    for selector, (source, weight) in good.items():
        write_aggregate(layout, selector, source, weight)
    write_aggregate(layout, hostile.id, keras_weights[0], weight=5)
    (worker,) = check_workers()
    os.kill(worker, signal.SIGSTOP)  # busy: the reports after the first queue up
    caplog.set_level("INFO", logger="fl_coordinator.storage.checker")
    async with fatal_to_open(layout.agg_checkpoint(hostile.id)) as kills:
        await client.report(first.id)
        await job_sent_to(worker)
        for selector in (hostile, *others):
            await client.report(selector.id)
        await trio.testing.wait_all_tasks_blocked()  # their checks wait for the worker
        os.kill(worker, signal.SIGCONT)
        with trio.fail_after(WINDOW):
            done = await watcher.wait_for(completed(1))
    assert done["stage"] == "COMPLETED"
    assert sorted(done["reported"]) == sorted(good)
    assert done["rejected"] == {
        hostile.id: f"{layout.selector_dir(hostile.id)}: checking these files ended its worker "
        f"process (exit {-signal.SIGKILL})"
    }
    assert len(kills.pids) == 2  # in the shared job, then alone
    assert "a check of 3 selectors' files failed as a whole" in caplog.text
    assert_arrays_close(read_floats(layout.checkpoint), fedavg(before, list(good.values())))
    assert len(check_workers()) == 1
    assert await thread_slots_in_use() == 0


READY = r"selectors at \S+:(\d+) \(FlIntra\), status stream at (\S+),"


async def test_serve_with_a_fifo_and_a_hung_check_stays_responsive_and_stops_on_sigterm(
    layout: Layout, keras_weights: list[Path], tmp_path: Path
) -> None:
    """The issue's freeze, against the real command: a FIFO froze the whole process, and a
    blocked check made it ignore SIGTERM."""
    env = {"FL_ROOT_PATH": str(layout.root), "HOST": "127.0.0.1", "PORT": "0",
           "STATUS_PORT": "0", "CHECKIN_LIMIT": "2", "MIN_REPORTING_FRACTION": "0.5",
           "REPORTING_TIMEOUT": "60", "CHECK_WORKERS": "1", "LOG_LEVEL": "INFO"}  # fmt: skip
    async with trio.open_nursery() as nursery:
        served = Child("coordinator", ["fl_coordinator", "serve"], tmp_path / "serve.log", env)
        ready = await served.start(nursery, READY)
        port = int(ready.group(1))
        watcher = await watch(nursery, ready.group(2))
        client = PurerpcClient(port)
        frozen, good = await FakeSelector().start(nursery), await FakeSelector().start(nursery)
        await configured(client, frozen, good)
        for selector in (frozen, good):
            write_aggregate(layout, selector.id, keras_weights[1], weight=2)
        fifo(layout.agg_checkpoint(frozen.id))
        for selector in (frozen, good):
            await client.report(selector.id)
        assert await health_now(port) == "SERVING"
        with trio.fail_after(WINDOW):
            done = await watcher.wait_for(completed(1))
        assert (done["stage"], done["reported"]) == ("COMPLETED", [good.id])
        assert "is a FIFO (named pipe), not a regular file" in done["rejected"][frozen.id]

        # Round 2: the check hangs (its worker stopped); then SIGTERM.
        assert served.process is not None
        (worker,) = check_workers(served.process.pid)
        os.kill(worker, signal.SIGSTOP)
        await configured(client, frozen, good)
        await client.report(good.id)
        await job_sent_to(worker)  # the check hangs now
        assert await health_now(port) == "SERVING"
        served.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):  # a hang fails here; unloaded it takes well under 1 s
            assert await served.wait() == 0
        nursery.cancel_scope.cancel()
    log = (tmp_path / "serve.log").read_text()
    assert "SIGTERM received: shutting down" in log and "Traceback" not in log
    assert not exists(worker)  # the stopped worker was killed, not left behind


async def _line(stream: trio.abc.ReceiveStream, pattern: str, seen: list[str]) -> re.Match[str]:
    """Read ``stream`` line by line (kept in ``seen``) until one matches ``pattern``."""
    regex, pending = re.compile(pattern), b""
    while chunk := await stream.receive_some(65536):
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            seen.append(line.decode(errors="replace"))
            if found := regex.search(seen[-1]):
                return found
    raise AssertionError(f"no line matched {pattern!r}:\n" + "\n".join(seen[-20:]))


@needs_fuse
@pytest.mark.fuse
@pytest.mark.parametrize("given_up", [True, False], ids=["given-up", "before-the-limit"])
@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "in-hdf5"])
async def test_serve_ends_cleanly_while_a_pass_still_waits(
    layout: Layout, keras_weights: list[Path], tmp_path: Path, given_up: bool, chunked: bool
) -> None:
    """SIGTERM while a pass still waits on a selector's hung storage, given up already
    (at CHECK_TIMEOUT) or not yet (its read, plain or inside HDF5, hangs when the signal
    comes): serve says so and ends with status 0 (once the kernel lets it: a FUSE read in
    flight holds a process until its server answers). It ended by SIGSEGV: HDF5's exit
    handler closed that pass's files through Python after Python's end."""
    env = {**os.environ, "FL_ROOT_PATH": str(layout.root), "HOST": "127.0.0.1", "PORT": "0",
           "STATUS_PORT": "0", "CHECKIN_LIMIT": "2", "MIN_REPORTING_FRACTION": "0.5",
           "REPORTING_TIMEOUT": "600", "CHECK_TIMEOUT": "2" if given_up else "600",
           "LOG_LEVEL": "INFO"}  # fmt: skip
    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "fl_coordinator", "serve"], stderr=subprocess.PIPE, env=env
        )
        assert process.stderr is not None
        try:
            with trio.fail_after(120):
                ready = await _line(process.stderr, READY, seen)
            watcher = await watch(nursery, ready.group(2))
            client = PurerpcClient(int(ready.group(1)))
            async with _hung_after_its_check(
                nursery, client, watcher, layout, keras_weights, tmp_path, chunked
            ) as hung:
                with trio.fail_after(WINDOW):
                    await trio.to_thread.run_sync(hung.mount.held, abandon_on_cancel=True)
                if given_up:
                    with trio.fail_after(WINDOW):
                        done = await watcher.wait_for(completed(1))
                    assert (done["reported"], list(done["rejected"])) == (
                        [hung.good.id],
                        [hung.hung.id],
                    )
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(WINDOW):
                    said = await _line(process.stderr, "still wait on a selector's storage", seen)
                assert hung.gate.exists()  # its read is still in flight as serve ends
                assert str(hung.file) in said.string
            with trio.fail_after(WINDOW):  # the storage answered: the process is let go
                assert await process.wait() == 0
        finally:
            process.kill()
        nursery.cancel_scope.cancel()
    assert not any("Traceback" in line for line in seen), "\n".join(seen)
