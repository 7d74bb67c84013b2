"""Plain copies of inputs stored in chunks, so that each chunk is read once per pass.

A selector chooses its file's layout freely: chunked, with the filters the
rules of ``untrusted.py`` accept (shuffle, fletcher32). Without a chunk
cache (untrusted files get none: K caches would not be flat in K), HDF5
reads a filtered chunk whole for each read that wants part of it, and an
unfiltered one in a call per run of values the read wants; the averaging
pass reads its inputs slab by slab in C order, the order its output is
written in. A filtered chunk spanning n slabs was read n times per input, a
column chunk a value per call: K = 10 inputs of a (2000, 2000)
float32 array took 2 s for the mean and 20 s for a median in (1048, 2000)
filtered chunks, 130 s and 155 s in unfiltered (2000, 1) column chunks, where
plain inputs take 0.1 s and 0.4 s. No slab order fits every input (each
chooses its own chunks), and a median needs all K inputs of a slab at once,
so slabs of whole chunks would hold K chunks.

So, before the pass, each input that is not plain is copied here, array by
array, in blocks of whole chunks (:func:`.slab.chunk_slabs`: each chunk read
and unfiltered once, in one call through a cache of one chunk, emptied once
the array is copied; a block of BLOCK_BYTES, or one chunk, in memory), into
a file of our own in the coordinator's tmp folder: the arrays' values
in C order, one after the other, as the input's encoding stores them (the
very bytes HDF5 gives the pass today, so the result is the same bits). The
pass then reads the copy as a plain input (:mod:`.plain`), at extents known
because we wrote them: one descriptor from a bounded pool, no HDF5 file kept
open per input (K = 10 of the same: 0.4 to 1.0 s, reading twice the inputs'
bytes). The copy costs one write of the input's values; the check
could make it instead (it already reads every chunk once, in its worker
process), but a copy made there would outlive the check: kept for a round
that may never aggregate it, made for every report and not only those
averaged, removed by another process than the one that made it, and its
space held through the reporting window. Made here, a copy lives exactly as
long as its pass.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import ContributionError, ShuttingDown
from .pass_control import PassControl
from .plain import Extent, reserve, write_at
from .slab import Selection, chunk_slabs, largest_slab, leading, slab_shape, slabs
from .untrusted import CHUNK_MAX_BYTES, FileIdentity, UntrustedFile

__all__ = ["BLOCK_BYTES", "HEADROOM", "HEADROOM_MAX_BYTES", "PlainCopy", "copy_plain", "kept_free"]

#: A copy reads blocks of whole chunks of about this many bytes (or one chunk, if more):
#: a block of column chunks is written in one ``pwrite`` per row, and at SLAB_BYTES K = 10
#: inputs of a (2000, 2000) float32 array in (2000, 1) chunks took 320,000 of them (1.5 s
#: for the pass, against 0.7 to 0.9 s here). A chunk may be as large (CHUNK_MAX_BYTES).
BLOCK_BYTES = CHUNK_MAX_BYTES

#: Share of the tmp folder's file system that copies leave free, up to HEADROOM_MAX_BYTES.
#: The pass holds every copy at once (K inputs in chunks: K copies of the model), and the
#: coordinator keeps writing beside it (its journal, its lease, the round log; other
#: problems may share the disk): taking all that was free, 30 copies of 800 kB left
#: 80 KiB of a 20 MiB file system during the pass. A copy that would cut into this is not
#: made (its input is read through HDF5 instead), like one that does not fit at all.
HEADROOM = 0.1

#: The most copies leave free, whatever the file system's size: what the coordinator
#: writes beside a pass is small, and 10% of a shared 250 GB disk (25 GB) refused copies
#: with tens of gigabytes free (seen on a disk 86% full).
HEADROOM_MAX_BYTES = 2**30


@dataclass(frozen=True)
class PlainCopy:
    """A plain copy of an input's arrays: the file (in the tmp folder, with the identity
    it had once written) and where each array's values lie in it, by name."""

    file: UntrustedFile
    extents: dict[str, Extent]


@contextlib.contextmanager
def copy_plain(
    arrays: Sequence[tuple[str, h5py.Dataset, np.dtype]],
    tmp_dir: Path,
    path: Path,
    cancel: PassControl | None = None,
    what: Callable[[str], str] = lambda name: f"dataset {name!r}",
) -> Iterator[PlainCopy]:
    """A plain copy of ``arrays`` (name, dataset, stored dtype) of input ``path``, made in
    ``tmp_dir`` and removed when the context ends, whatever happens.

    Raises ContributionError, ``"{path}: {what(name)} cannot be read (...)"``,
    when a chunk cannot be read or unfiltered: the input's fault. An OSError is ours: the
    copy cannot be written (no room in ``tmp_dir``, or less than HEADROOM of its file
    system left after it: its space is reserved before anything is read). ShuttingDown
    when ``cancel`` is set.
    """
    sizes = [stored.itemsize * math.prod(dataset.shape) for _, dataset, stored in arrays]
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".input-copy.", suffix=".tmp", dir=tmp_dir)
    copy = Path(name)
    if cancel is not None:
        cancel.scratch(copy)
    try:
        try:
            _keep_headroom(fd, sum(sizes))
            reserve(fd, sum(sizes))
            extents: dict[str, Extent] = {}
            offset = 0
            for (array, dataset, stored), nbytes in zip(arrays, sizes, strict=True):
                extents[array] = Extent(offset, nbytes, dataset.shape, stored.itemsize)
                failed = f"{path}: {what(array)} cannot be read"
                _copy_array(dataset, stored, fd, extents[array], failed, cancel, path)
                offset += nbytes
            identity = FileIdentity.of(os.fstat(fd))
        finally:
            os.close(fd)
        yield PlainCopy(UntrustedFile(tmp_dir, copy.name, identity), extents)
    finally:
        copy.unlink(missing_ok=True)


def kept_free(size: int) -> int:
    """Bytes that copies leave free on a file system of ``size`` bytes: HEADROOM of it, at
    most HEADROOM_MAX_BYTES."""
    return min(int(HEADROOM * size), HEADROOM_MAX_BYTES)


def _keep_headroom(fd: int, nbytes: int) -> None:
    """OSError ENOSPC if writing ``nbytes`` more to ``fd``'s file system would leave less
    than :func:`kept_free` of it free (nothing, where it has no size: ramfs)."""
    disk = os.fstatvfs(fd)
    left = disk.f_bavail * disk.f_frsize
    keep = kept_free(disk.f_blocks * disk.f_frsize)
    if disk.f_blocks and left - keep < nbytes:
        raise OSError(
            errno.ENOSPC,
            f"{os.strerror(errno.ENOSPC)}: {nbytes} bytes would leave less than {keep} bytes "
            f"of the file system free ({left} bytes free now)",
        )


def _copy_array(
    dataset: h5py.Dataset,
    stored: np.dtype,
    fd: int,
    extent: Extent,
    failed: str,
    cancel: PassControl | None,
    path: Path,
) -> None:
    """Copy ``dataset``'s values, in blocks of whole chunks, to ``extent`` of ``fd``;
    ContributionError, ``failed`` and why, if HDF5 cannot read them. Each read is a wait
    on ``path``'s storage for ``cancel`` (see :mod:`.pass_control`): the copy as a whole
    may take longer than any one call may wait."""
    waiting = functools.partial(_waiting, cancel, path)
    shape, itemsize = dataset.shape, stored.itemsize
    if dataset.chunks is None:  # contiguous or compact, not readable as plain (byte order)
        largest = largest_slab(shape, itemsize, budget=BLOCK_BYTES)
        blocks = slabs(shape, itemsize, budget=BLOCK_BYTES)
    else:
        largest, blocks = chunk_slabs(shape, dataset.chunks, itemsize, BLOCK_BYTES)
    buffer = np.empty(largest, stored)
    for block in blocks:
        if cancel is not None and cancel.is_set():
            raise ShuttingDown("aggregation cancelled: shutting down")
        values = leading(buffer, slab_shape(shape, block))
        with waiting():
            _read(functools.partial(dataset.read_direct, values, source_sel=block or None), failed)
        data = memoryview(values.reshape(-1).view(np.uint8))
        start = 0
        for first, count in _runs(shape, block):
            write_at(fd, data[start : start + count * itemsize], extent.offset + first * itemsize)
            start += count * itemsize
    # Each dataset keeps its chunk cache while open, and the file's datasets stay open
    # while the file is copied: the chunks last read of 40 arrays held 290 MB. Refreshed
    # (closed and opened again inside HDF5), it holds none.
    with waiting():
        _read(dataset.id.refresh, failed)


def _waiting(cancel: PassControl | None, path: Path) -> contextlib.AbstractContextManager[None]:
    """A wait on ``path``'s storage inside HDF5, marked for ``cancel`` if there is one."""
    return contextlib.nullcontext() if cancel is None else cancel.waiting_on(path, in_hdf5=True)


def _read(call: Callable[[], object], failed: str) -> None:
    """``call()``, which reads a dataset; ContributionError (the input's fault) if it fails."""
    try:
        call()
    except (OSError, RuntimeError, ValueError) as error:  # a chunk HDF5 cannot read
        raise ContributionError(f"{failed} ({type(error).__name__}: {error})") from None


def _runs(shape: tuple[int, ...], block: Selection) -> Iterator[tuple[int, int]]:
    """The runs of consecutive values (C-order index of the first, count) that ``block``
    (a slice of each of the first axes of an array of ``shape``, the rest whole) covers,
    in the block's own C order: where its values go in a C-order file."""
    if not block:
        yield 0, math.prod(shape)
        return
    strides = [math.prod(shape[axis + 1 :]) for axis in range(len(shape))]
    last = len(block) - 1  # the run's axis: the last one not covered whole
    while last > 0 and (block[last].start, block[last].stop) == (0, shape[last]):
        last -= 1
    run = block[last]
    count = (run.stop - run.start) * strides[last]
    for index in itertools.product(*(range(part.start, part.stop) for part in block[:last])):
        first = sum(i * stride for i, stride in zip(index, strides, strict=False))
        yield first + run.start * strides[last], count
