"""The check of one selector's contribution: what ``checker.py`` runs in a worker process.

:func:`examine` reads a selector's weight and aggregate by the rules of
``untrusted.py``, against the layout of the global checkpoint
(:class:`CheckpointSpec`, read by the coordinator from its own file and
passed in, so that the check never touches the global checkpoint and a
problem with that file is never blamed on a selector). It reads every value
once (NaN and Inf hide anywhere) and returns the :class:`Contribution` the
aggregation will use: the weight as read, the identity of the aggregate
that passed and, when the strategy clips updates, the aggregate's squared
L2 norm, measured in the same read.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import ContributionError
from .aggregation import Contribution, read_into
from .plain import Extent, extent_of, read_slab
from .slab import chunk_slabs, largest_slab, slabs
from .untrusted import (
    CHUNK_MAX_BYTES,
    WEIGHT_MAX_BYTES,
    FileIdentity,
    UntrustedFile,
    close_of,
    dataset_at,
    fstat_of,
    read_of,
)
from .weights import Encoding, Weight

__all__ = [
    "MAX_WEIGHT",
    "SETTLE_SECONDS",
    "CheckpointSpec",
    "NotSettled",
    "SelectorFiles",
    "examine",
    "read_weight",
    "update_norm",
]

#: A selector's weight is a count of training batches; anything above this is
#: a broken file, not a real federation (and would lose float64 precision).
MAX_WEIGHT = 2**53

#: How long after its last change a file is left alone before it is checked.
#: File times advance in clock ticks (1 to 10 ms on Linux): a file rewritten in
#: the same tick as its last change would keep its identity, so the check waits
#: until that tick is over and any later write shows (see FileIdentity).
SETTLE_SECONDS = 0.02


@dataclass(frozen=True)
class CheckpointSpec:
    """What a selector's aggregate must hold: the global checkpoint's weight arrays.

    ``plan`` is the checkpoint's plan (:func:`.weights.read_plan`, read by the
    coordinator at start-up from its own file); ``file_bytes`` is the size of
    the checkpoint file; ``measure_norms``: also measure each aggregate's norm
    (``SELECTOR_CLIP_NORM``).
    """

    plan: tuple[Weight, ...]
    file_bytes: int
    measure_norms: bool = False

    @property
    def max_aggregate_bytes(self) -> int:
        """Largest aggregate file read: twice the checkpoint's values and file, plus 16 MiB.

        An aggregate holds the same arrays as the checkpoint (uncompressed, as
        Keras writes them; 16-bit ones may be uploaded twice as wide) and may
        carry its other data too; HDF5's own overhead differs between
        writers, hence the slack.
        """
        values = sum(
            int(np.prod(w.shape, dtype=object)) * w.encoding.stored.itemsize for w in self.plan
        )
        return 2 * (values + self.file_bytes) + 16 * 2**20


@dataclass(frozen=True)
class SelectorFiles:
    """Where a selector's files are: ``root/<selector>/<checkpoint>`` and ``.../<weight>``."""

    root: Path
    checkpoint: str
    weight: str

    def of(self, selector: str, name: str) -> UntrustedFile:
        return UntrustedFile(self.root, f"{selector}/{name}")


def read_weight(source: UntrustedFile) -> int:
    """A selector's ``fl_agg_checkpoint_weight``: a positive decimal integer, read once."""
    path = source.path
    fd, _ = source.open_fd("weight file", WEIGHT_MAX_BYTES)
    try:
        raw = read_of(fd, WEIGHT_MAX_BYTES + 1, path, "weight file")
    finally:
        close_of(fd)
    text = raw.decode("ascii", errors="replace").strip()
    if not text:
        raise ContributionError(f"{path}: weight file is empty")
    if not text.isdigit():
        raise ContributionError(f"{path}: weight {text[:20]!r} is not a decimal integer")
    weight = int(text)
    if weight <= 0:
        raise ContributionError(f"{path}: weight is {weight}; it must be at least 1")
    if weight > MAX_WEIGHT:
        raise ContributionError(
            f"{path}: weight of {len(text)} digits is absurdly large (> 2**53 = {MAX_WEIGHT})"
        )
    return weight


class NotSettled(Exception):
    """A file changed less than SETTLE_SECONDS ago: look again after ``wait`` seconds."""

    def __init__(self, wait: float) -> None:
        super().__init__(wait)
        self.wait = wait


def _settled(fd: int, path: Path, wait: bool) -> os.stat_result:
    """``fstat`` of ``fd`` (the aggregate ``path``) once its last change is at least
    SETTLE_SECONDS old: waited for here if ``wait``, else NotSettled is raised."""
    status = fstat_of(fd, path, "aggregate checkpoint")
    age = time.time() - status.st_ctime_ns / 1e9
    if age < SETTLE_SECONDS:
        rest = SETTLE_SECONDS - max(age, 0.0)  # a clock behind the file's: still bounded
        if not wait:
            raise NotSettled(rest)
        time.sleep(rest)
        status = fstat_of(fd, path, "aggregate checkpoint")
    return status


def _check_values(
    dataset: h5py.Dataset,
    encoding: Encoding,
    name: str,
    path: Path,
    measure: bool,
    raw_at: tuple[int, Extent] | None = None,
) -> float:
    """Raise ContributionError for NaN or Inf; return the squared L2 norm if ``measure``.

    ``raw_at``: the descriptor the file is open on and a plain dataset's extent
    (see :mod:`.plain`), to read its values with ``preadv`` instead of
    through h5py: for a small aggregate, h5py's read cost more than ten times
    as much (0.26 ms against 0.02 ms on a fresh file).
    """
    shape, itemsize = dataset.shape, encoding.stored.itemsize
    if dataset.chunks is None:
        largest, selections = largest_slab(shape, itemsize), slabs(shape, itemsize)
    else:  # whole chunks at a time: each read once (see chunk_slabs)
        largest, selections = chunk_slabs(shape, dataset.chunks, itemsize)
    buffer = np.empty(largest, encoding.stored)
    square = 0.0
    for selection in selections:
        if raw_at is None:
            raw = read_into(buffer, dataset, selection)
        else:
            raw = read_slab(*raw_at, selection, buffer, path)
        part = encoding.decode(raw)
        if not np.all(np.isfinite(part)):
            raise ContributionError(f"{path}: dataset {name!r} contains NaN or Inf")
        if measure:  # in the accumulator's precision: float32 squares of n * delta overflow
            wide = part.astype(encoding.accumulator).ravel()
            square += float(np.vdot(wide, wide).real)
    return square


def update_norm(source: UntrustedFile, plan: Sequence[Weight], what: str = "upload") -> float:
    """The L2 norm of ``source``'s weight arrays of ``plan``, all together, in float64.

    For a reference selector under differential privacy, which refuses a
    client's update longer than the clip norm. Blocking (run it in a worker
    thread); ContributionError if the file cannot be read as ``plan`` says or
    holds NaN or Inf.
    """
    square = 0.0
    with source.open_hdf5(what, None, CHUNK_MAX_BYTES) as opened:  # whole chunks, one call each
        try:
            for array in plan:
                dataset, encoding = dataset_at(opened.file, array, source.path)
                square += _check_values(dataset, encoding, array.name, source.path, True)
        except (OSError, RuntimeError) as error:
            raise ContributionError(
                f"{source.path}: {what} cannot be read ({type(error).__name__}: {error})"
            ) from None
    return math.sqrt(square)


def examine(
    selector: str, files: SelectorFiles, spec: CheckpointSpec, settle: bool = True
) -> Contribution:
    """Check ``selector``'s files against ``spec``; raise ContributionError if unusable.

    A checkpoint changed less than SETTLE_SECONDS ago is waited for, or if
    not ``settle``, NotSettled is raised (before any of it is read).
    """
    weight = read_weight(files.of(selector, files.weight))
    source = files.of(selector, files.checkpoint)
    # A chunk cache of one chunk: whole chunks are read, each in one call (see open_hdf5).
    with source.open_hdf5(
        "aggregate checkpoint", spec.max_aggregate_bytes, CHUNK_MAX_BYTES
    ) as opened:
        before = FileIdentity.of(_settled(opened.fd, source.path, settle))
        square = 0.0
        plain: dict[str, tuple[Extent, Encoding]] | None = {}
        try:
            for array in spec.plan:
                dataset, encoding = dataset_at(opened.file, array, source.path)
                extent = extent_of(dataset, encoding.stored, before.size, source.path)
                square += _check_values(
                    dataset, encoding, array.name, source.path, spec.measure_norms,
                    None if extent is None else (opened.fd, extent),
                )  # fmt: skip
                if plain is not None and extent is not None:
                    plain[array.name] = (extent, encoding)
                else:
                    plain = None  # the aggregation reads this file through h5py
        except (OSError, RuntimeError) as error:
            # HDF5's answers to a malformed file (a broken B-tree, a truncated
            # dataset, ...): the file's fault.
            raise ContributionError(
                f"{source.path}: aggregate checkpoint cannot be read "
                f"({type(error).__name__}: {error})"
            ) from None
        if FileIdentity.of(fstat_of(opened.fd, source.path, "aggregate checkpoint")) != before:
            raise ContributionError(f"{source.path}: aggregate checkpoint changed while checked")
    checked = UntrustedFile(source.root, source.name, before)
    if spec.measure_norms and not math.isfinite(square):
        raise ContributionError(f"{source.path}: aggregate checkpoint's L2 norm overflows float64")
    return Contribution(
        selector, checked, weight, square if spec.measure_norms else None, plain or None
    )
