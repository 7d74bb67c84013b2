"""The coordinator's own HDF5 files through descriptors of ours (``storage/hdf5_fd.py``):
locked as HDF5 locks them, and a failed write raised as the system's OSError."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers.selector_fs import mounted, needs_fuse
from storage.test_disk_full import _mounted

from fl_coordinator.storage.hdf5_fd import open_own


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 1 MiB at ``tmp_path/small``, filled up to its last 32 KiB."""
    with _mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as point:
        disk = os.statvfs(point)
        (point / "filler").write_bytes(bytes(disk.f_bavail * disk.f_frsize - 32 * 2**10))
        yield point


def test_a_write_failing_as_the_file_is_closed_raises_its_oserror(small: Path) -> None:
    """HDF5 writes most of a file's metadata as it is closed: 2000 groups (about 100 KiB
    of it) in 32 KiB free raise ENOSPC there, and no descriptor is left open.

    Before (7c1fdf4): h5py's fileobj driver turned the failed write into
    ``AttributeError: '_WholeIO' object has no attribute 'truncate'``, which the
    aggregation reported as an internal error, the cause (a full disk) lost.
    """
    before = _descriptors()
    created = 0
    with pytest.raises(OSError) as raised, open_own(small / "new.h5", "w") as own:
        for index in range(2000):
            own.file.create_group(f"g{index}")
            created += 1
    assert created == 2000  # it failed as the file was closed, not before
    assert raised.value.errno == errno.ENOSPC
    assert _descriptors() == before


@pytest.mark.parametrize(
    "value", ["TRUE", "1", "FALSE", "0", "false", "BEST_EFFORT", "best_effort", "", None]
)
def test_the_lock_is_taken_where_hdf5_takes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    """HDF5_USE_FILE_LOCKING as HDF5 reads it: with a file locked by another holder,
    open_own opens it exactly where h5py (HDF5's sec2 driver, its own lock) does.

    Before (7c1fdf4): "false" (HDF5 knows only "FALSE") turned our lock off, HDF5's on.
    """
    path = tmp_path / "checkpoint.h5"
    with h5py.File(path, "w") as file:
        file["a"] = np.arange(3.0)
    if value is None:
        monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    else:
        monkeypatch.setenv("HDF5_USE_FILE_LOCKING", value)
    holder = os.open(path, os.O_RDWR)  # flock locks belong to the open file: this one excludes
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        # HDF5 reads the variable once, as the library starts: asked in a process of its own.
        hdf5 = subprocess.run(
            [sys.executable, "-c", f"import h5py; h5py.File({str(path)!r}, 'r').close()"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert hdf5.returncode == 0 or "unable to lock file" in hdf5.stderr, hdf5.stderr
        try:
            with open_own(path, "r") as own:
                assert own.file["a"][2] == 2.0
            ours_opens = True
        except BlockingIOError:
            ours_opens = False
    finally:
        os.close(holder)
    assert ours_opens == (hdf5.returncode == 0) == (value in ("FALSE", "0"))


def test_hdf5_lets_go_of_a_file_whose_close_failed(small: Path) -> None:
    """A close that fails (ENOSPC) leaves no file open in HDF5: none on the descriptor,
    whose number is soon another file's.

    Before (7c1fdf4): HDF5 kept the file (a FileID on ``<_io.FileIO name=N>``): a flush
    of it wrote 708,894 bytes of HDF5 over a file opened after the failure, and the
    process crashed in HDF5 (SIGSEGV in the failing aggregation, or SIGSEGV/SIGBUS at
    exit; scratch/rt14/agg.py).
    """

    def ours(number: int) -> list[str]:
        kept = h5py.h5f.get_obj_ids(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)
        return [name for file in kept if f"name={number} " in (name := file.name.decode())]

    with pytest.raises(OSError) as raised, open_own(small / "new.h5", "w") as own:
        number = own.fd
        for index in range(2000):
            own.file.create_group(f"g{index}")
    assert raised.value.errno == errno.ENOSPC
    assert ours(number) == []


_AGGREGATE_TWICE = """
import shutil, sys
from pathlib import Path
from fl_coordinator.errors import CheckpointError
from fl_coordinator.storage.aggregation import Contribution, aggregate
from fl_coordinator.storage.untrusted import UntrustedFile
checkpoint, contribution, ballast = (Path(a) for a in sys.argv[1:])
what = lambda: Contribution("s", UntrustedFile.at(contribution), 2)
try:
    aggregate(checkpoint, [what()], checkpoint.parent / "tmp")
except CheckpointError as error:
    print(error)
ballast.unlink()
print(aggregate(checkpoint, [what()], checkpoint.parent / "tmp").arrays)
"""


def test_a_chunked_checkpoint_that_does_not_fit_fails_the_aggregation_not_the_process(
    tmp_path: Path,
) -> None:
    """A chunked, compressed global checkpoint (its chunks are allocated as they are
    written, after the new file's space is reserved) on a disk that fills up: the
    aggregation is a CheckpointError (ENOSPC), the next one, with room, succeeds, and
    the process exits 0. In a process of its own: a crash in HDF5 is the fault.

    Before (7c1fdf4): SIGSEGV inside the first aggregation (exit status -11).
    """
    rng = np.random.default_rng(1)
    contribution = tmp_path / "contribution"
    with h5py.File(contribution, "w") as file:
        file["w"] = rng.random(200_000).astype(np.float32)
    with _mounted(tmp_path / "mnt", "-t", "tmpfs", "-o", "size=4m", "tmpfs") as point:
        checkpoint = point / "fl_checkpoint"
        with h5py.File(checkpoint, "w") as file:
            data = rng.random(200_000).astype(np.float32)
            file.create_dataset("w", data=data, chunks=(8192,), compression="gzip")
        (point / "tmp").mkdir()
        ballast = point / "ballast"  # 400 kB left: the reservation fits, the chunks not
        ballast.write_bytes(bytes(shutil.disk_usage(point).free - 400_000))
        before = checkpoint.read_bytes()
        ran = subprocess.run(
            [
                sys.executable,
                "-c",
                _AGGREGATE_TWICE,
                *(str(p) for p in (checkpoint, contribution, ballast)),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert ran.returncode == 0, ran.stderr[-2000:]
        failed, second = ran.stdout.splitlines()
        assert failed.startswith(f"cannot write the new global checkpoint {checkpoint}")
        assert failed.endswith("[Errno 28] No space left on device")
        assert second == "1"
        assert checkpoint.read_bytes() != before  # the second one was published
        assert list((point / "tmp").iterdir()) == []


_OPEN_AND_EXIT = """
import sys
from pathlib import Path
from fl_coordinator.errors import ContributionError
from fl_coordinator.storage.untrusted import UntrustedFile
try:
    with UntrustedFile(Path(sys.argv[1]), sys.argv[2]).open_hdf5("aggregate checkpoint"):
        print("opened")
except ContributionError as error:
    print(error)
"""


@needs_fuse
@pytest.mark.fuse
@pytest.mark.parametrize("after", [1, 2, 3])
def test_an_open_whose_read_fails_leaves_nothing_to_crash_at_exit(
    tmp_path: Path, after: int
) -> None:
    """A selector's file system failing the ``after``-th read of an HDF5 open (EIO):
    the open is refused, and the process then exits 0. In a process of its own: the
    fault was at exit.

    Before: exit status -11 (SIGSEGV). The failed read's OSError, kept with its
    traceback by the file object, held the frame that held the file object, which
    HDF5's never-closed file held from C: freed only by HDF5's exit handler, after
    Python's end.
    """
    served = tmp_path / "served"
    served.mkdir()
    with h5py.File(served / "fl_agg_checkpoint", "w") as file:
        file["layers/dense/vars/0"] = np.ones((5, 4), np.float32)
    with mounted(served, tmp_path / "bad", "fl_agg_checkpoint", "read", errno.EIO, after):
        ran = subprocess.run(
            [sys.executable, "-c", _OPEN_AND_EXIT, str(tmp_path), "bad/fl_agg_checkpoint"],
            capture_output=True,
            text=True,
            check=False,
        )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout == (
        f"{tmp_path}/bad/fl_agg_checkpoint: aggregate checkpoint is not a readable HDF5 "
        "file ([Errno 5] Input/output error)\n"
    )
