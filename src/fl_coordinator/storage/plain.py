"""Plain datasets, read without HDF5: where a contiguous array's bytes lie in its file.

Keras writes every weight array as a *plain* dataset: contiguous, no
filters, allocated, in the file itself, in the machine's byte order. Its
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

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import ContributionError
from .untrusted import FileIdentity, UntrustedFile

__all__ = ["Descriptors", "Extent", "extent_of", "read_rows"]


@dataclass(frozen=True, slots=True)
class Extent:
    """A plain dataset's values: ``nbytes`` bytes at ``offset`` in its file, C order."""

    offset: int
    nbytes: int
    #: Bytes per row (the first axis; all of it for a scalar).
    row_bytes: int


def extent_of(dataset: h5py.Dataset, stored: np.dtype, file_size: int, path: Path) -> Extent | None:
    """Where ``dataset``'s values lie, if it is plain and stored as ``stored``; else None.

    Raises ContributionError if HDF5 places them (partly) outside the file's
    ``file_size`` bytes, or their size is not the shape's.
    """
    dcpl = dataset.id.get_create_plist()
    if (
        dcpl.get_layout() != h5py.h5d.CONTIGUOUS
        or dcpl.get_nfilters()
        or dcpl.get_external_count()
        or dataset.dtype != stored
        or not stored.isnative
    ):
        return None
    offset = dataset.id.get_offset()
    if offset is None:  # never written: every value is the fill value
        return None
    shape = dataset.shape
    nbytes = stored.itemsize * int(np.prod(shape, dtype=np.int64))
    if dataset.id.get_storage_size() != nbytes or not 0 <= offset <= file_size - nbytes:
        raise ContributionError(
            f"{path}: dataset {dataset.name!r} says its {nbytes} bytes lie at offset {offset}, "
            f"outside the file's {file_size} bytes"
        )
    rows = shape[0] if shape else 1
    return Extent(offset, nbytes, nbytes // rows if rows else 0)


def read_rows(
    fd: int, extent: Extent, selection: tuple[slice, ...], buffer: np.ndarray, path: Path
) -> np.ndarray:
    """Rows ``selection`` (one slice of the first axis, or ``()``: all) of a plain dataset,
    read from ``fd`` into the leading rows of ``buffer`` (C-contiguous); return that view.

    Raises ContributionError on a short read (the file is no longer what was checked).
    """
    if selection:
        rows = selection[0]
        view = buffer[: rows.stop - rows.start]
        offset = extent.offset + rows.start * extent.row_bytes
    else:
        view, offset = buffer, extent.offset
    target = memoryview(view.reshape(-1).view(np.uint8))  # bytes of any dtype, no copy
    done = 0
    while done < len(target):
        got = os.preadv(fd, [target[done:]], offset + done)
        if got == 0:
            raise ContributionError(f"{path}: file ended before its data: changed after its check")
        done += got
    return view


class Descriptors:
    """Open descriptors of untrusted files, at most ``limit`` at once (least recently used
    closed first), so an averaging pass over K plain inputs holds ``min(K, limit)``.

    Each file is (re)opened by the rules of :meth:`.UntrustedFile.open_fd`,
    with its identity: a file changed since it was first opened is refused.
    """

    def __init__(self, limit: int = 64) -> None:
        self._limit = limit
        self._open: dict[UntrustedFile, int] = {}

    def get(self, source: UntrustedFile) -> int:
        fd = self._open.pop(source, None)
        if fd is None:
            if len(self._open) >= self._limit:
                os.close(self._open.pop(next(iter(self._open))))
            fd, _ = source.open_fd("aggregate checkpoint")
        self._open[source] = fd  # now the most recently used
        return fd

    def changed(self, source: UntrustedFile) -> bool:
        """Whether ``source`` is no longer the file of its identity (written to, replaced)."""
        try:
            fd = self.get(source)
        except ContributionError:
            return True
        return FileIdentity.of(os.fstat(fd)) != source.identity

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()
