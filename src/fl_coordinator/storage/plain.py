"""Plain datasets, read without HDF5: where a contiguous array's bytes lie in its file.

Keras writes every weight array as a *plain* dataset: contiguous, no
filters, allocated, in the file itself, in the machine's byte order. The
new checkpoint's plain datasets are created with their space allocated at
once, and their values written with ``os.pwrite`` at their offset. Its
values are then ``nbytes`` consecutive bytes at a fixed offset, which
``os.preadv`` reads straight into a reused buffer: no HDF5 call, no lock
and no open HDF5 file per input during the averaging pass (an open h5py
file costs about 0.65 MB; a descriptor is all a plain input needs, and it
can be closed and opened again between reads). Every other layout
(chunked, compressed, filtered, another byte order) is left to h5py.

The offset comes from HDF5 (``Dataset.id.get_offset()``) reading a file
that is untrusted: it is checked against the file's size, so nothing
outside the file is ever read, and a read that comes back short (the file
was truncated since) refuses the input.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import ContributionError
from .pass_control import PassControl
from .slab import Selection, leading, slab_shape, start_of
from .untrusted import FileIdentity, UntrustedFile, close_of, fstat_of

__all__ = [
    "DESCRIPTORS",
    "Descriptors",
    "Extent",
    "allocated_early",
    "extent_of",
    "read_slab",
    "reserve",
    "write_at",
    "write_slab",
]


@dataclass(frozen=True, slots=True)
class Extent:
    """A plain dataset's values: ``nbytes`` bytes at ``offset`` in its file, C order."""

    offset: int
    nbytes: int
    #: The dataset's shape, and the bytes of one value (where a slab's bytes lie).
    shape: tuple[int, ...]
    itemsize: int


def _contiguous(dcpl: h5py.h5p.PropDCID) -> bool:
    """Whether a dataset of these creation properties keeps its values in one piece, as is."""
    return (
        dcpl.get_layout() == h5py.h5d.CONTIGUOUS
        and not dcpl.get_nfilters()
        and not dcpl.get_external_count()
    )


def allocated_early(dcpl: h5py.h5p.PropDCID) -> h5py.h5p.PropDCID:
    """``dcpl``, if contiguous, with its space allocated at creation and never filled.

    A new dataset created so has an offset at once, where its values can be
    written with ``pwrite`` (:func:`write_slab`), each once; other layouts
    are returned as they are.
    """
    if not _contiguous(dcpl):
        return dcpl
    early = dcpl.copy()
    early.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    early.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return early


def extent_of(
    dataset: h5py.Dataset, stored: np.dtype, file_size: int | None, path: Path
) -> Extent | None:
    """Where ``dataset``'s values lie, if it is plain and stored as ``stored``; else None.

    Raises ContributionError if HDF5 places them (partly) outside the file's
    ``file_size`` bytes, or their size is not the shape's, or it cannot say
    where. ``file_size`` None: a file this process is writing (its values are
    not there yet).
    """
    if (
        not _contiguous(dataset.id.get_create_plist())
        or dataset.dtype != stored
        or not stored.isnative
    ):
        return None
    try:
        offset = dataset.id.get_offset()
        storage_size = dataset.id.get_storage_size()
    except (OSError, RuntimeError, ValueError) as error:  # address 0 (the superblock), ...
        raise ContributionError(
            f"{path}: dataset {dataset.name!r}: HDF5 cannot say where its values lie ({error})"
        ) from None
    if offset is None:  # never written: every value is the fill value
        return None
    shape = dataset.shape
    nbytes = stored.itemsize * int(np.prod(shape, dtype=np.int64))
    if file_size is None:
        file_size = offset + nbytes
    if storage_size != nbytes:
        raise ContributionError(
            f"{path}: dataset {dataset.name!r} stores {storage_size} bytes for the "
            f"{nbytes} its shape {shape} and type {stored} hold"
        )
    if not 0 <= offset <= file_size - nbytes:
        raise ContributionError(
            f"{path}: dataset {dataset.name!r} says its {nbytes} bytes lie at offset {offset}, "
            f"outside the file's {file_size} bytes"
        )
    return Extent(offset, nbytes, shape, stored.itemsize)


def read_slab(
    fd: int, extent: Extent, selection: Selection, buffer: np.ndarray, path: Path
) -> np.ndarray:
    """Slab ``selection`` (see :mod:`.slab`; ``()``: all) of a plain dataset, read from
    ``fd`` into the leading values of ``buffer`` (C-contiguous); return that view.

    Raises ContributionError on a short read (the file was cut short since its size was
    taken, which is after it was opened: a file changed while it was checked, or since).
    """
    view, offset = _place(extent, selection, buffer)
    target = _bytes(view)
    done = 0
    while done < len(target):
        got = os.preadv(fd, [target[done:]], offset + done)
        if got == 0:
            raise ContributionError(
                f"{path}: file ended before its data: it was cut short after it was opened"
            )
        done += got
    return view


def write_slab(fd: int, extent: Extent, values: np.ndarray, selection: Selection) -> None:
    """Write ``values`` (C-contiguous, slab ``selection`` of the dataset) at their place."""
    _, offset = _place(extent, selection, values)
    write_at(fd, _bytes(values), offset)


def write_at(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (``pwrite`` may write less at once)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


#: fallocate(2) (Linux), not os.posix_fallocate: where the file system cannot
#: reserve space, glibc's posix_fallocate writes a byte into every block
#: instead (262,144 writes for a 1 GB file on an old NFS), and we skip it.
_fallocate = getattr(ctypes.CDLL(None, use_errno=True), "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def reserve(fd: int, nbytes: int) -> None:
    """Reserve the first ``nbytes`` of ``fd``'s file on disk before they are written.

    A new file written with ``pwrite`` otherwise has its blocks found page by
    page as the kernel writes it back (ext4's delayed allocation): writing a
    1 GB checkpoint took 0.8 to 2.3 s, against 0.15 to 0.6 s reserved first
    (this machine, 4 MiB writes). Also fails at once, not midway, when the
    disk is full (OSError ENOSPC). Does nothing where the file system or the
    platform cannot reserve space.

    A reservation that cannot be had takes nothing: ``nbytes`` (which the
    global checkpoint's declared shapes set, whatever its own size) beyond
    the file system's free blocks is refused before any is taken, and blocks
    a failed fallocate took are given back. ext4 keeps them otherwise: a
    failed 1 TB reservation left the disk full while the file was open, so
    HDF5's own writes to it (and the journal's) failed with ENOSPC too.
    """
    if _fallocate is None or nbytes <= 0:
        return
    status = os.fstat(fd)
    disk = os.fstatvfs(fd)  # no blocks at all: a file system without a size (ramfs)
    if disk.f_blocks and nbytes - status.st_blocks * 512 > disk.f_bfree * disk.f_frsize:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if _fallocate(fd, 0, 0, nbytes) == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.ENOSYS):
        return
    os.ftruncate(fd, status.st_size)  # frees what it took beyond the file's end
    raise OSError(code, os.strerror(code))


def _place(extent: Extent, selection: Selection, buffer: np.ndarray) -> tuple[np.ndarray, int]:
    """The leading values of ``buffer`` that slab ``selection`` fills, and their file offset."""
    view = leading(buffer, slab_shape(extent.shape, selection))
    return view, extent.offset + extent.itemsize * start_of(extent.shape, selection)


def _bytes(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array of any dtype, without a copy."""
    return memoryview(array.reshape(-1).view(np.uint8))


#: Descriptors an averaging pass keeps open at most (shared by its lanes).
DESCRIPTORS = 64


class Descriptors:
    """Open descriptors of untrusted files, at most ``limit`` at once (least recently used
    closed first), so an averaging pass over K plain inputs holds ``min(K, limit)``.

    Each file is (re)opened by the rules of :meth:`.UntrustedFile.open_fd`,
    with its identity: a file changed since it was first opened is refused.
    Each open, ``fstat`` and close is a wait on the file's storage for ``control``
    (see :mod:`.pass_control`): a FUSE or NFS server may answer none of them.
    """

    def __init__(self, limit: int = DESCRIPTORS, control: PassControl | None = None) -> None:
        self._limit = limit
        self._control = PassControl() if control is None else control
        self._open: dict[UntrustedFile, int] = {}

    def get(self, source: UntrustedFile) -> int:
        fd = self._open.pop(source, None)
        if fd is None:
            if len(self._open) >= self._limit:
                oldest = next(iter(self._open))
                self._close(oldest, self._open.pop(oldest))
            with self._control.waiting_on(source.path):
                fd, _ = source.open_fd("aggregate checkpoint")
        self._open[source] = fd  # now the most recently used
        return fd

    def changed(self, source: UntrustedFile) -> bool:
        """Whether ``source`` is no longer the file of its identity (written to, replaced),
        or its file system cannot say."""
        try:
            fd = self.get(source)
            with self._control.waiting_on(source.path):
                status = fstat_of(fd, source.path, "file")
        except ContributionError:
            return True
        return FileIdentity.of(status) != source.identity

    def close(self) -> None:
        while self._open:
            self._close(*self._open.popitem())

    def _close(self, source: UntrustedFile, fd: int) -> None:
        with self._control.waiting_on(source.path):
            close_of(fd)
