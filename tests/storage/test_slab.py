"""Slabs (storage/slab.py): every value once, in C order, each slab one run of values."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import numpy as np
import pytest

from fl_coordinator.storage import slab
from fl_coordinator.storage.slab import (
    chunk_slabs,
    largest_slab,
    leading,
    slab_shape,
    slabs,
    start_of,
)

SHAPES = [(), (1,), (7,), (5, 4), (1, 1, 3, 40), (2, 3, 20), (3, 0, 5), (0,), (4, 1, 1, 9)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("slab_bytes", [8, 64, 200, 2**20])
def test_slabs_cover_every_value_once_in_order_each_a_run(
    shape: tuple[int, ...], slab_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slab, "SLAB_BYTES", slab_bytes)
    values = np.arange(math.prod(shape)).reshape(shape)
    flat: list[int] = []
    for index, selection in enumerate(slabs(shape)):
        part = values[selection] if selection else values
        assert part.shape == slab_shape(shape, selection)
        if index == 0:
            assert part.shape == largest_slab(shape)  # what the buffers are made for
        assert part.size <= math.prod(largest_slab(shape))
        # one run of consecutive values, starting where start_of says
        run = part.reshape(-1)
        if run.size:
            assert list(run) == list(range(start_of(shape, selection), run[0] + run.size))
            assert run.size * 8 <= max(slab_bytes, 8)  # no more than a slab (or one value)
        flat.extend(run)
    assert flat == list(range(values.size))


def test_rows_wider_than_a_slab_are_cut_within(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, a slab was whole rows: a (1, N) array was one slab, whatever N."""
    monkeypatch.setattr(slab, "SLAB_BYTES", 64)  # 8 float64 values
    assert list(slabs((1, 20))) == [
        (slice(0, 1), slice(start, min(start + 8, 20))) for start in (0, 8, 16)
    ]
    assert list(slabs((2, 3, 20))) == [
        (slice(i, i + 1), slice(j, j + 1), slice(start, min(start + 8, 20)))
        for i, j in itertools.product(range(2), range(3))
        for start in (0, 8, 16)
    ]
    assert list(slabs((5, 4))) == [(slice(0, 2),), (slice(2, 4),), (slice(4, 5),)]  # rows fit: rows


def test_leading_is_a_view_of_the_first_values() -> None:
    buffer = np.arange(12.0)
    view = leading(buffer, (1, 2, 3))
    assert view.shape == (1, 2, 3)
    view[...] = -1
    assert list(buffer[:7]) == [-1.0] * 6 + [6.0]


def test_slabs_are_made_one_at_a_time_not_listed() -> None:
    """A median of K selectors cuts slabs K times smaller, and each selection of an array
    of many axes holds a slice per axis: listed, the selections of this 64 MiB array
    (128,071 slabs of 8 axes) took 80 MB, more than the array; made one at a time,
    almost nothing."""
    shape = (1,) * 7 + (2**24,)
    tracemalloc.start()
    try:
        count = sum(1 for _ in slabs(shape, 8 * 1000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 2**24 // (slab.SLAB_BYTES // 8000) + 1
    assert peak < 2**20
    assert largest_slab(shape, 8 * 1000) == (1,) * 7 + (slab.SLAB_BYTES // 8000,)


@pytest.mark.parametrize(
    ("shape", "chunks"),
    [((7,), (3,)), ((5, 4), (2, 4)), ((5, 4), (5, 1)), ((1, 1, 3, 40), (1, 1, 2, 7)),
     ((2, 3, 20), (1, 2, 20)), ((1, 20), (1, 20))],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("slab_bytes", [8, 64, 200, 2**20])
def test_chunk_slabs_cover_every_value_once_in_whole_chunks(
    shape: tuple[int, ...], chunks: tuple[int, ...], slab_bytes: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(slab, "SLAB_BYTES", slab_bytes)
    seen = np.zeros(shape, np.int64)
    largest, selections = chunk_slabs(shape, chunks, 8)
    for selection in selections:
        part = seen[selection]
        assert part.shape == slab_shape(shape, selection)
        assert part.size <= math.prod(largest)
        assert part.size * 8 <= max(slab_bytes, 8 * math.prod(chunks))
        for axis, where in enumerate(selection):  # starts and ends on a chunk's edge
            assert where.start % chunks[axis] == 0
            assert where.stop % chunks[axis] == 0 or where.stop == shape[axis]
        part += 1
    assert np.all(seen == 1)
