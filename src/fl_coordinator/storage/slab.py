"""Slabs: the pieces, of about :data:`SLAB_BYTES`, in which arrays are streamed.

Averaging (and checking) an array never holds it whole: it goes slab by slab,
into buffers reused from one slab to the next, so memory is bounded by a few
slabs whatever the size of the array. A slab is a *hyperslab contiguous in C
order*: one index of each axis before some axis ``k``, a range of axis ``k``,
all of every axis after it. ``k`` is the first axis whose trailing block (one
index of it) fits in a slab, so for most arrays a slab is whole rows
(``k = 0``); an array whose rows are wider than a slab, such as a 1x1
convolution's kernel ``(1, 1, 512, 2048)``, is cut within its rows, not held
a row at a time. Being contiguous, a slab of a plain dataset is one run of
bytes in its file (:mod:`.plain`), and its values fill the first elements of
a C-contiguous buffer (:func:`leading`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np

__all__ = [
    "SLAB_BYTES",
    "Selection",
    "chunk_slabs",
    "largest_slab",
    "leading",
    "slab_shape",
    "slabs",
    "start_of",
]

#: Arrays are streamed in slabs of about this many bytes (in float64): memory
#: stays bounded by a few slabs, whatever the size of the largest array. Small
#: enough that a slab's accumulator, its input and its result stay in the
#: processor's cache while the K inputs are added and the step applied (8 MiB
#: made every addition a trip to memory: 96 MB x 8 took 1.5 times as long),
#: large enough that the calls per slab cost little (at 256 KiB they showed).
SLAB_BYTES = 2**20

#: One slab of an array: a slice of each of its first axes (the rest whole);
#: ``()`` is all of it (a scalar).
Selection = tuple[slice, ...]


def slabs(
    shape: tuple[int, ...],
    itemsize: int = 8,
    *,
    whole_rows: bool = False,
    budget: int | None = None,
) -> Iterator[Selection]:
    """Selections covering an array of ``shape`` in C order, in slabs of at most about
    SLAB_BYTES (one value, if a value is larger), made one at a time.

    ``itemsize`` is the bytes each value costs while a slab is worked on (8: a
    float64 accumulator; more where several work arrays are held per value).
    ``whole_rows``: never cut within a row (a slab is then at least one row),
    for readers to whom that costs more than memory (see :mod:`.aggregation`).
    ``budget``: bytes of a slab, if not SLAB_BYTES. Never listed: a median of K
    selectors cuts K times more slabs, each a slice per axis, which listed could
    outweigh the array itself.
    """
    if not shape:
        yield ()
        return
    axis, step = _cut(shape, itemsize, whole_rows, budget)
    length = shape[axis]
    for outer in itertools.product(*(range(n) for n in shape[:axis])):
        before = tuple(slice(index, index + 1) for index in outer)
        for start in range(0, length, step):
            yield (*before, slice(start, min(start + step, length)))


def largest_slab(
    shape: tuple[int, ...],
    itemsize: int = 8,
    *,
    whole_rows: bool = False,
    budget: int | None = None,
) -> tuple[int, ...]:
    """The shape of the largest of :func:`slabs` (the first): what its buffers hold."""
    if not shape:
        return ()
    axis, step = _cut(shape, itemsize, whole_rows, budget)
    return (*(1,) * axis, min(step, shape[axis]), *shape[axis + 1 :])


def _cut(
    shape: tuple[int, ...], itemsize: int, whole_rows: bool, budget: int | None
) -> tuple[int, int]:
    """The axis ``k`` the slabs of ``shape`` cut, and how many of its indices a slab takes."""
    budget = SLAB_BYTES if budget is None else budget
    axis = 0  # the first whose trailing block fits (the last axis' is one value)
    while (
        not whole_rows
        and axis < len(shape) - 1
        and itemsize * math.prod(shape[axis + 1 :]) > budget
    ):
        axis += 1
    return axis, max(1, budget // max(itemsize * math.prod(shape[axis + 1 :]), 1))


def chunk_slabs(
    shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int, budget: int | None = None
) -> tuple[tuple[int, ...], Iterator[Selection]]:
    """Selections covering an array of ``shape`` stored in ``chunks``, each of whole chunks
    (cut only by the array's edges), of about SLAB_BYTES (or ``budget`` bytes) or one chunk
    if that is more (``itemsize``: bytes per value); and the shape of the largest.

    For a reader that needs each value once in any order (a check): HDF5 reads
    a chunk whole whatever part of it is asked for, so C-order slabs would read
    a chunk that spans n of them n times (untrusted files get no chunk cache).
    These are :func:`slabs` of the grid of chunks, not runs in C order.
    """
    grid = tuple(-(-length // chunk) for length, chunk in zip(shape, chunks, strict=True))
    chunk_bytes = itemsize * math.prod(chunks)

    def values(selection: Selection) -> Selection:
        return tuple(
            slice(part.start * chunk, min(part.stop * chunk, length))
            for part, chunk, length in zip(selection, chunks, shape, strict=False)
        )

    first = largest_slab(grid, chunk_bytes, budget=budget)
    largest = slab_shape(shape, values(tuple(slice(0, n) for n in first)))
    return largest, (values(selection) for selection in slabs(grid, chunk_bytes, budget=budget))


def slab_shape(shape: tuple[int, ...], selection: Selection) -> tuple[int, ...]:
    """The shape of ``selection`` (one of :func:`slabs`) of an array of ``shape``."""
    return (*(part.stop - part.start for part in selection), *shape[len(selection) :])


def start_of(shape: tuple[int, ...], selection: Selection) -> int:
    """The index, in C order, of the first value of ``selection`` in an array of ``shape``."""
    return sum(part.start * math.prod(shape[axis + 1 :]) for axis, part in enumerate(selection))


def leading(buffer: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The first ``prod(shape)`` values of ``buffer`` (C-contiguous, at least that large),
    as an array of ``shape``: a view, so a slab's values fill a reused buffer."""
    return buffer.reshape(-1)[: math.prod(shape)].reshape(shape)
