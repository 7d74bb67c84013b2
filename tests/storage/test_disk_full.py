"""The coordinator's own files cannot be written: the round fails, the process lives on.

A real ``fl-coordinator serve`` process serves a problem folder on a small
tmpfs this test mounts. Mid-way the file system is filled up (ENOSPC) or
remounted read-only (EROFS): the next round fails with an error naming the
journal, the health check says NOT_SERVING, the process keeps serving, and
once space (or write access) is back it recovers by itself and the following
round completes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import trio
from helpers.peers import FakeSelector, PurerpcClient, completed, watch, write_aggregate
from helpers.processes import Served, environment

from fl_coordinator.cli.health import probe
from fl_coordinator.config import Settings, default_settings
from fl_coordinator.errors import CheckpointError
from fl_coordinator.storage.aggregation import Contribution, aggregate
from fl_coordinator.storage.journal import read_journal
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.plain import reserve
from fl_coordinator.storage.untrusted import UntrustedFile

READY = re.compile(r"selectors at \S+:(\d+) \(FlIntra\), status stream at (\S+),")


@contextlib.contextmanager
def _mounted(point: Path, *how: str) -> Iterator[Path]:
    """``mount *how point`` (the test runs as root) for the ``with`` block, unmounted after."""
    point.mkdir()
    subprocess.run(["mount", *how, str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 4 MiB at ``tmp_path/mnt``."""
    with _mounted(tmp_path / "mnt", "-t", "tmpfs", "-o", "size=4m", "tmpfs") as point:
        yield point


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    """An ext4 file system of 32 MiB (a loop device) at ``tmp_path/ext4``.

    ext4, unlike tmpfs, keeps the blocks a failed fallocate(2) took.
    """
    image = tmp_path / "ext4.img"
    with image.open("wb") as file:
        file.truncate(32 * 2**20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    with _mounted(tmp_path / "ext4", "-o", "loop", str(image)) as point:
        yield point


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A ramfs at ``tmp_path/ramfs``: no fallocate(2) (EOPNOTSUPP), no size (statvfs: 0
    blocks, 0 free)."""
    with _mounted(tmp_path / "ramfs", "-t", "ramfs", "ramfs") as point:
        yield point


def fill(folder: Path) -> Path:
    """Write a file until the file system is full (ENOSPC); return it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(65536))
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def remount(point: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


FAULTS: dict[str, tuple[Callable[[Path], Callable[[], None]], str]] = {
    "disk full": (lambda point: fill(point).unlink, "[Errno 28] No space left on device"),
    "read-only": (
        lambda point: (remount(point, "ro"), lambda: remount(point, "rw"))[1],
        "[Errno 30] Read-only file system",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_unwritable_root_fails_the_round_and_the_coordinator_recovers(
    settings: Settings, keras_weights, mount: Path, nursery: trio.Nursery, fault: str
) -> None:
    root = mount / "root"
    shutil.copytree(settings.fl_root_path, root)
    layout = Layout.from_settings(default_settings().replace(fl_root_path=str(root)))
    served = Served(environment(root, CHECKIN_LIMIT="1", LOG_LEVEL="INFO"))
    try:
        ready = READY.search(await trio.to_thread.run_sync(served.wait_for_line, "FlIntra"))
        assert ready is not None
        port, url = int(ready.group(1)), ready.group(2)
        address = f"127.0.0.1:{port}"
        watcher = await watch(nursery, url)
        client = PurerpcClient(port)
        selector = await FakeSelector().start(nursery)

        async def one_round(number: int) -> dict:
            assert await client.check_in(selector.id) is True
            await selector.told.receive()
            await client.report(selector.id)
            return await watcher.wait_for(completed(number))

        write_aggregate(layout, selector.id, keras_weights[0], weight=3)
        assert (await one_round(1))["stage"] == "COMPLETED"
        assert (await trio.to_thread.run_sync(probe, address)).serving

        # Round 2: the fault comes between rounds; the selector's files are already there.
        make_fault, text = FAULTS[fault]
        before = digest(layout.checkpoint)
        undo = make_fault(mount)
        failed = await one_round(2)
        assert failed["stage"] == "FAILED" and failed["rejected"] == {}
        assert failed["error"].startswith(
            f"cannot write the round journal {layout.own / 'journal.json'}: {text}; "
        )
        line = await trio.to_thread.run_sync(served.wait_for_line, "cannot write the round journal")
        assert text in line and "the coordinator goes on" in line
        assert not (await trio.to_thread.run_sync(probe, address)).serving  # NOT_SERVING
        assert served.process.poll() is None  # still running
        assert digest(layout.checkpoint) == before

        undo()  # space, or write access, is back: the writer's retry notices
        await trio.to_thread.run_sync(served.wait_for_line, "is written again")
        assert (await trio.to_thread.run_sync(probe, address)).serving
        done = await one_round(3)
        assert (done["stage"], done.get("error")) == ("COMPLETED", None)
        assert digest(layout.checkpoint) != before

        served.process.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(served.process.wait) == 0
        entry = read_journal(layout)
        assert (entry.round, entry.stage) == (4, "SELECTION")
        # A failure is said once, and its end once, not at each attempt. Which writes fail
        # while the disk is full depends on what was being written as the test filled it
        # (the end of round 1: its journal entries, its round log line), and one may get
        # through (said twice, with its end between, in one of six whole suites).
        said = [
            "failed" if "goes on and tries again" in line else "written"
            for line in served.rest().splitlines()
            if "goes on and tries again" in line
            or ("the round journal" in line and "is written again" in line)
        ]
        assert said and said == ["failed", "written"] * (len(said) // 2), said
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()


def _does_not_fit(checkpoint: Path, aggregate_file: Path) -> None:
    """Averaging ``aggregate_file`` into ``checkpoint`` fails for want of space, clearly:
    the checkpoint unchanged, nothing left in the temporary folder beside it."""
    before = digest(checkpoint)
    tmp = checkpoint.parent / "tmp"
    with pytest.raises(CheckpointError) as failed:
        aggregate(checkpoint, [Contribution("s", UntrustedFile.at(aggregate_file), 2)], tmp)
    assert str(failed.value).startswith(f"cannot write the new global checkpoint {checkpoint}")
    assert str(failed.value).endswith("[Errno 28] No space left on device")
    assert digest(checkpoint) == before
    assert list(tmp.iterdir()) == []


def test_a_new_checkpoint_that_does_not_fit_is_a_checkpoint_error(
    tmp_path: Path, mount: Path
) -> None:
    """ENOSPC while the new checkpoint is written: a clear error, nothing left behind."""
    checkpoint = mount / "fl_checkpoint"
    with h5py.File(checkpoint, "w") as file:
        file["w"] = np.ones(300_000, np.float32)  # 1.2 MB: the new one does not fit twice
    (tmp_path / "agg").write_bytes(checkpoint.read_bytes())
    fill(mount).unlink()  # measure, then leave a bit less than a second copy's room
    free = shutil.disk_usage(mount).free
    (mount / "ballast").write_bytes(bytes(free - 600_000))
    _does_not_fit(checkpoint, tmp_path / "agg")


def test_a_reservation_that_does_not_fit_takes_no_space(ext4: Path) -> None:
    """reserve() of more than the disk holds: ENOSPC, and the disk is as free as before
    while the file is still open (ext4 kept a failed fallocate's blocks: free space 0)."""
    free = shutil.disk_usage(ext4).free
    disk = os.statvfs(ext4)
    every_block = disk.f_bfree * disk.f_frsize  # root may use the reserved blocks too
    for asked in (every_block + 2**20, 2**40):  # a little more than is free; a crafted 1 TB
        fd = os.open(ext4 / "new", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"superblock")
            with pytest.raises(OSError) as failed:
                reserve(fd, asked)
            assert failed.value.errno == errno.ENOSPC
            assert os.fstat(fd).st_size == 10
            assert shutil.disk_usage(ext4).free >= free - 65536, asked
        finally:
            os.close(fd)
            os.unlink(ext4 / "new")


def test_a_checkpoint_declaring_more_than_the_disk_is_a_checkpoint_error(
    tmp_path: Path, ext4: Path
) -> None:
    """A global checkpoint of 9 KB whose never-written array declares 64 MiB (more than the
    disk): a CheckpointError naming ENOSPC (was HDF5's raw RuntimeError from closing a file
    on the disk the reservation had filled), the checkpoint unchanged, nothing left behind."""
    checkpoint = ext4 / "fl_checkpoint"
    for path in (checkpoint, tmp_path / "agg"):
        with h5py.File(path, "w") as file:
            file["layers/a/vars/0"] = np.ones(10, np.float32)
            file.create_dataset("layers/b/vars/0", shape=(2**24,), dtype=np.float32)
    free = shutil.disk_usage(ext4).free
    _does_not_fit(checkpoint, tmp_path / "agg")
    assert shutil.disk_usage(ext4).free >= free - 65536


def test_a_file_system_without_fallocate_averages_the_same(tmp_path: Path, ramfs: Path) -> None:
    """ramfs: reserve() does nothing (fallocate: EOPNOTSUPP; its statvfs says 0 blocks
    free, which a check before reserving must not take for a full disk), and the new
    checkpoint holds the same values as one written where blocks are reserved."""
    fd = os.open(ramfs / "new", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        reserve(fd, 2**20)
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    results = {}
    for folder in (tmp_path / "disk", ramfs):
        folder.mkdir(exist_ok=True)
        for name, value in (("fl_checkpoint", 1.5), ("agg", 4.0)):
            with h5py.File(folder / name, "w") as file:
                file["layers/d/vars/0"] = np.full((300, 40), value, np.float32)
        part = Contribution("s", UntrustedFile.at(folder / "agg"), 2)
        aggregate(folder / "fl_checkpoint", [part], folder / "tmp")
        with h5py.File(folder / "fl_checkpoint") as file:
            results[folder] = file["layers/d/vars/0"][()]
    assert np.all(results[ramfs] == 3.5)
    assert results[ramfs].tobytes() == results[tmp_path / "disk"].tobytes()
