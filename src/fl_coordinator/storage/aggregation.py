"""FedAvg over HDF5 checkpoints: ``w_new = w + (sum_s A_s) / (sum_s N_s)``.

Pure numeric work on files, run in a worker thread (``trio.to_thread``) so the
event loop keeps answering RPCs. It does not assume a Keras layout: it walks
the checkpoint and treats every floating-point dataset as a weight array.

How it is laid out, and why:

* The new checkpoint is the old one's layout with new float values: groups,
  attributes (with their own HDF5 types), non-float datasets (copied by
  HDF5) and each float dataset's creation properties (chunking, compression,
  fill value) are reproduced, and each float dataset's values are written
  exactly once. (A byte copy of the old file overwritten in place keeps the
  layout too, but writes every value twice and reads the old ones back: at
  K = 2 that was a quarter of the time.)
* Reads go straight into one preallocated buffer per array (``read_direct``)
  and the result is computed into another, so a slab costs no allocation.
  HDF5 reads are serialised by h5py's lock, so K inputs are read one after
  the other: threads would only add switching.

* One array at a time: for each dataset we hold the float64 accumulator and
  one input array, never K whole models, so memory is bounded by the largest
  array, whatever K is.
* Sums are accumulated in float64 (K aggregates of float32 values weighted by
  batch counts lose digits in float32) and the result is written in each
  dataset's own dtype.
* Nothing touches the global checkpoint until the new file is complete and
  on disk; then one rename publishes it (see :func:`layout.atomic_target`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import AggregationError, ShuttingDown
from .atomic import atomic_target

__all__ = [
    "SLAB_BYTES",
    "AggregationResult",
    "Aggregator",
    "Contribution",
    "Finish",
    "aggregate",
    "check_contribution",
    "float_datasets",
    "read_weight",
    "slabs",
    "sum_into",
]

#: A selector's weight is a count of training batches; anything above this is
#: a broken file, not a real federation (and would lose float64 precision).
_MAX_WEIGHT = 2**53


@dataclass(frozen=True)
class Contribution:
    """One selector's aggregate: ``checkpoint`` holds ``A_s``, ``weight`` holds ``N_s``."""

    selector: str
    checkpoint: Path
    weight: Path


@dataclass(frozen=True)
class AggregationResult:
    arrays: int
    bytes_read: int
    total_weight: int
    seconds: float


#: The signature of :func:`aggregate`, for code that takes one as a parameter.
Aggregator = Callable[
    [Path, Sequence[Contribution], Path, threading.Event | None], AggregationResult
]


def read_weight(path: Path) -> int:
    """Read a selector's ``fl_agg_checkpoint_weight``: a positive decimal integer."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AggregationError(f"{path}: weight file is missing") from None
    except OSError as error:
        raise AggregationError(f"{path}: weight file is unreadable ({error.strerror})") from None
    text = raw.decode("ascii", errors="replace").strip()
    if not text:
        raise AggregationError(f"{path}: weight file is empty")
    if not text.isdigit():
        raise AggregationError(f"{path}: weight {text[:40]!r} is not a decimal integer")
    weight = int(text)
    if weight <= 0:
        raise AggregationError(f"{path}: weight is {weight}; it must be at least 1")
    if weight > _MAX_WEIGHT:
        raise AggregationError(f"{path}: weight {weight} is absurdly large (> {_MAX_WEIGHT})")
    return weight


def float_datasets(group: h5py.Group) -> list[str]:
    """Names of every floating-point dataset below ``group``, in a stable order."""
    names: list[str] = []

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f":
            names.append(name)

    group.visititems(visit)
    return names


def _open_h5(path: Path, stack: ExitStack, what: str) -> h5py.File:
    if not path.exists():
        raise AggregationError(f"{path}: {what} is missing")
    try:
        return stack.enter_context(h5py.File(path, "r"))
    except OSError as error:
        raise AggregationError(f"{path}: {what} is not a readable HDF5 file ({error})") from None


def _matching(file: h5py.File, name: str, like: h5py.Dataset, path: Path) -> h5py.Dataset:
    """Dataset ``name`` of an aggregate, checked against the checkpoint's shape and dtype."""
    dataset = file.get(name)
    if not isinstance(dataset, h5py.Dataset):
        raise AggregationError(f"{path}: dataset {name!r} is missing")
    if dataset.shape != like.shape:
        raise AggregationError(
            f"{path}: dataset {name!r} has shape {dataset.shape}, expected {like.shape}"
        )
    if dataset.dtype != like.dtype:
        raise AggregationError(
            f"{path}: dataset {name!r} has dtype {dataset.dtype}, expected {like.dtype}"
        )
    return dataset


#: Arrays are streamed in slabs of about this many bytes (in float64): memory
#: stays bounded by a few slabs, whatever the size of the largest array.
SLAB_BYTES = 8 * 2**20


def slabs(shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Selections covering an array of ``shape`` in row slabs of about SLAB_BYTES."""
    if not shape:
        return [()]
    row_bytes = 8 * int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, SLAB_BYTES // max(row_bytes, 1))
    return [(slice(start, min(start + step, shape[0])),) for start in range(0, shape[0], step)]


def _slab_shape(shape: tuple[int, ...], selection: tuple[slice, ...]) -> tuple[int, ...]:
    if not selection:
        return shape
    rows = selection[0]
    return (rows.stop - rows.start, *shape[1:])


def _read_into(
    buffer: np.ndarray, dataset: h5py.Dataset, path: Path, selection: tuple[slice, ...]
) -> np.ndarray:
    """Read ``dataset[selection]`` into (the leading rows of) ``buffer``; return that view."""
    rows = buffer[: selection[0].stop - selection[0].start] if selection else buffer
    try:
        dataset.read_direct(rows, source_sel=selection or None)
    except OSError as error:
        raise AggregationError(
            f"{path}: dataset {dataset.name!r} cannot be read ({error})"
        ) from None
    return rows


def _copy_attrs(source: h5py.HLObject, dest: h5py.HLObject) -> None:
    """Every attribute, with its own shape and HDF5 type (not re-guessed from the value)."""
    for key in source.attrs:
        spec = source.attrs.get_id(key)
        dest.attrs.create(key, source.attrs[key], shape=spec.shape, dtype=spec.dtype)


def _copy_layout(source: h5py.File, dest: h5py.File, floats: Sequence[str]) -> None:
    """Make ``dest`` like ``source`` except that the datasets ``floats`` are created empty.

    They keep their type, shape and creation properties (chunking, filters,
    fill value), so the caller writes each value once.
    """
    empty = set(floats)
    _copy_attrs(source, dest)

    def visit(name: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Group):
            _copy_attrs(obj, dest.create_group(name))
        elif name in empty:
            dataset_id = obj.id
            h5py.h5d.create(
                dest.id,
                name.encode(),
                dataset_id.get_type(),
                dataset_id.get_space(),
                dcpl=dataset_id.get_create_plist(),
            )
            _copy_attrs(obj, dest[name])
        else:
            dest.copy(obj, name)

    source.visititems(visit)


#: Turns the float64 sum of the inputs over one slab into the values to write:
#: ``finish(sum, template_values, out)`` fills ``out`` (the dataset's dtype,
#: cast by the last ufunc, no extra pass) and may work in place on ``sum``.
Finish = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


def _non_finite(
    paths: Sequence[Path], datasets: Sequence[h5py.Dataset], selection: tuple[slice, ...]
) -> str:
    """Which files hold NaN or Inf in ``selection`` (only run once a slab failed the test)."""
    culprits = [
        str(path)
        for path, dataset in zip(paths, datasets, strict=True)
        if not np.all(np.isfinite(dataset[selection]))
    ]
    return ", ".join(culprits) or "the result (overflow of the dtype)"


def sum_into(
    template: Path,
    inputs: Sequence[Path],
    dest: Path,
    tmp_dir: Path,
    finish: Finish,
    cancel: threading.Event | None = None,
) -> tuple[int, int]:
    """Write ``dest``: ``template``'s layout whose float datasets hold ``finish(sum)``.

    ``sum`` is the float64 sum of the same dataset over ``inputs``, each checked
    against the template's shape and dtype and for NaN/Inf, computed slab by
    slab. ``dest`` is replaced atomically, and only if everything succeeded
    (it may be ``template`` itself). Returns (arrays written, input bytes read).
    """
    bytes_read = 0
    arrays = 0
    with ExitStack() as stack:
        files = [_open_h5(path, stack, "aggregate checkpoint") for path in inputs]
        base = _open_h5(template, stack, "checkpoint")
        names = float_datasets(base)
        with atomic_target(dest, tmp_dir, large=True) as tmp, h5py.File(tmp, "w") as out:
            _copy_layout(base, out, names)
            for name in names:
                like, target = base[name], out[name]
                sources = [
                    _matching(file, name, like, path)
                    for file, path in zip(files, inputs, strict=True)
                ]
                selections = slabs(like.shape)
                largest = _slab_shape(like.shape, selections[0])
                buffer = np.empty(largest, like.dtype)  # one input's slab, as stored
                sums = np.empty(largest, np.float64)
                result = np.empty(largest, like.dtype)
                for selection in selections:
                    if cancel is not None and cancel.is_set():
                        raise ShuttingDown("aggregation cancelled: shutting down")
                    rows = _slab_shape(like.shape, selection)[:1] if selection else ()
                    total = sums[: rows[0]] if rows else sums
                    # The first two inputs start the float64 sum in one pass (the
                    # memory traffic is what costs: no zeros pass, no cast copy);
                    # ``result`` holds the second until it holds the result.
                    parts = zip(sources, inputs, strict=True)
                    first = _read_into(buffer, *next(parts), selection)
                    if len(sources) > 1:
                        second = _read_into(result, *next(parts), selection)
                        np.add(first, second, out=total, dtype=np.float64)
                    else:
                        total[...] = first
                    for source, path in parts:
                        total += _read_into(buffer, source, path, selection)
                    bytes_read += len(sources) * first.nbytes
                    current = _read_into(buffer, like, template, selection)
                    values = result[: rows[0]] if rows else result

                    with np.errstate(over="ignore", invalid="ignore"):  # tested just below
                        finish(total, current, values)

                    # NaN or Inf in any input, or a result too large for the dtype,
                    # makes the values' sum non-finite: one cheap test per slab (on
                    # the result, in its own dtype), the exact search only if it fails.
                    if not np.isfinite(values.sum()) and not np.all(np.isfinite(values)):
                        where = _non_finite([*inputs, template], [*sources, like], selection)
                        raise AggregationError(f"dataset {name!r} contains NaN or Inf in {where}")
                    target.write_direct(values, dest_sel=selection or None)
                arrays += 1
    return arrays, bytes_read


def aggregate(
    checkpoint: Path,
    contributions: Sequence[Contribution],
    tmp_dir: Path,
    cancel: threading.Event | None = None,
) -> AggregationResult:
    """Replace ``checkpoint`` by the FedAvg of ``contributions``; raise AggregationError.

    On any error (or when ``cancel`` is set) the checkpoint is left untouched.
    """
    if not contributions:
        raise AggregationError("no selector aggregates to average")
    started = time.perf_counter()
    total_weight = sum(read_weight(c.weight) for c in contributions)

    def finish(total: np.ndarray, current: np.ndarray, out: np.ndarray) -> None:
        total /= total_weight
        np.add(total, current, out=out, casting="same_kind")

    inputs = [c.checkpoint for c in contributions]
    arrays, bytes_read = sum_into(checkpoint, inputs, checkpoint, tmp_dir, finish, cancel)
    return AggregationResult(
        arrays=arrays,
        bytes_read=bytes_read,
        total_weight=total_weight,
        seconds=time.perf_counter() - started,
    )


def check_contribution(checkpoint: Path, contribution: Contribution) -> None:
    """Raise AggregationError unless a selector's files can be averaged into ``checkpoint``.

    Run when the selector reports, so that one bad selector is rejected on its
    own (the round goes on with the others) instead of failing the whole
    aggregation later. It reads every array once: NaN and Inf hide anywhere.
    """
    read_weight(contribution.weight)
    with ExitStack() as stack:
        aggregate_file = _open_h5(contribution.checkpoint, stack, "aggregate checkpoint")
        global_file = _open_h5(checkpoint, stack, "global checkpoint")
        for name in float_datasets(global_file):
            source = _matching(aggregate_file, name, global_file[name], contribution.checkpoint)
            selections = slabs(source.shape)
            buffer = np.empty(_slab_shape(source.shape, selections[0]), source.dtype)
            for selection in selections:
                part = _read_into(buffer, source, contribution.checkpoint, selection)

                if not np.all(np.isfinite(part)):
                    raise AggregationError(
                        f"dataset {name!r} contains NaN or Inf in {contribution.checkpoint}"
                    )
