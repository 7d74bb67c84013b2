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

The inputs are untrusted files (a selector's aggregate, a client's upload):
each is opened and each of its datasets reached by the rules of
``untrusted.py``. For the coordinator they have passed their check already
(``contribution.py``, in a worker process); what could still go wrong is a
file changed since. An input that is not the file that was checked, or is
written to while it is read, is refused (:class:`ContributionsRefused`)
before anything is published, and the caller averages the others.
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

from ..errors import AggregationError, ContributionError, ContributionsRefused, ShuttingDown
from .layout import atomic_target
from .untrusted import Opened, UntrustedFile, dataset_at

#: A selector's weight is a count of training batches; anything above this is
#: a broken file, not a real federation (and would lose float64 precision).
MAX_WEIGHT = 2**53


@dataclass(frozen=True)
class Contribution:
    """One selector's aggregate ``A_s`` (``checkpoint``) and its weight ``N_s``.

    Made by the check of the selector's files (:func:`.contribution.examine`):
    the weight is the number read then, the checkpoint carries the identity
    of the file that passed.
    """

    selector: str
    checkpoint: UntrustedFile
    weight: int


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


def float_datasets(group: h5py.Group) -> list[str]:
    """Names of every floating-point dataset below ``group``, in a stable order."""
    names: list[str] = []

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f":
            names.append(name)

    group.visititems(visit)
    return names


def _open_template(path: Path, stack: ExitStack) -> h5py.File:
    """The global checkpoint (or a selector's first upload): a file of our own side."""
    if not path.exists():
        raise AggregationError(f"{path}: checkpoint is missing")
    try:
        return stack.enter_context(h5py.File(path, "r"))
    except OSError as error:
        raise AggregationError(f"{path}: checkpoint is not readable HDF5 ({error})") from None


def _open_inputs(inputs: Sequence[UntrustedFile], stack: ExitStack) -> list[Opened]:
    """Open every input; refuse all that cannot be, at once (one retry, not one per input)."""
    opened: list[Opened] = []
    refused: dict[str, str] = {}
    for source in inputs:
        try:
            opened.append(stack.enter_context(source.open_hdf5("aggregate checkpoint")))
        except ContributionError as error:
            refused[str(source.path)] = str(error)
    if refused:
        raise ContributionsRefused(refused)
    return opened


def _refused(source: Opened, name: str, error: Exception) -> ContributionsRefused:
    """Input ``source`` refused because dataset ``name`` of it could not be used."""
    path = source.source.path
    if isinstance(error, ContributionError):
        return ContributionsRefused({str(path): str(error)})
    reason = f"{path}: dataset {name!r} cannot be read ({type(error).__name__}: {error})"
    return ContributionsRefused({str(path): reason})


def _input_dataset(source: Opened, name: str, like: h5py.Dataset) -> h5py.Dataset:
    try:
        return dataset_at(source.file, name, like.shape, like.dtype, source.source.path)
    except (ContributionError, OSError, RuntimeError, TypeError, ValueError) as error:
        raise _refused(source, name, error) from None


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


def slab_shape(shape: tuple[int, ...], selection: tuple[slice, ...]) -> tuple[int, ...]:
    if not selection:
        return shape
    rows = selection[0]
    return (rows.stop - rows.start, *shape[1:])


def read_into(
    buffer: np.ndarray, dataset: h5py.Dataset, selection: tuple[slice, ...]
) -> np.ndarray:
    """Read ``dataset[selection]`` into (the leading rows of) ``buffer``; return that view."""
    rows = buffer[: selection[0].stop - selection[0].start] if selection else buffer
    dataset.read_direct(rows, source_sel=selection or None)
    return rows


def _read_input(
    buffer: np.ndarray, dataset: h5py.Dataset, source: Opened, selection: tuple[slice, ...]
) -> np.ndarray:
    try:
        return read_into(buffer, dataset, selection)
    except OSError as error:
        raise _refused(source, dataset.name, error) from None


def _read_template(
    buffer: np.ndarray, dataset: h5py.Dataset, path: Path, selection: tuple[slice, ...]
) -> np.ndarray:
    try:
        return read_into(buffer, dataset, selection)
    except OSError as error:
        message = f"{path}: dataset {dataset.name!r} cannot be read ({error})"
        raise AggregationError(message) from None


def _copy_attrs(source: h5py.HLObject, dest: h5py.HLObject) -> None:
    """Every attribute, with its own shape and HDF5 type (not re-guessed from the value)."""
    for key in source.attrs:
        spec = source.attrs.get_id(key)
        dest.attrs.create(key, source.attrs[key], shape=spec.shape, dtype=spec.dtype)


def copy_layout(source: h5py.File, dest: h5py.File, floats: Sequence[str]) -> None:
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
    name: str,
    sources: Sequence[Opened],
    datasets: Sequence[h5py.Dataset],
    template: h5py.Dataset,
    path: Path,
    selection: tuple[slice, ...],
) -> AggregationError:
    """Which file holds NaN or Inf in ``selection`` (only run once a slab failed the test).

    An input is refused alone; NaN or Inf in the template, or nowhere (the
    result overflows its dtype), is a failure of the whole average.
    """
    refused = {
        str(source.source.path): f"{source.source.path}: dataset {name!r} contains NaN or Inf"
        for source, dataset in zip(sources, datasets, strict=True)
        if not np.all(np.isfinite(dataset[selection]))
    }
    if refused:
        return ContributionsRefused(refused)
    where = path if not np.all(np.isfinite(template[selection])) else "the result (overflow)"
    return AggregationError(f"dataset {name!r} contains NaN or Inf in {where}")


def sum_into(
    template: Path,
    inputs: Sequence[UntrustedFile],
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
    Raises ContributionsRefused (keyed by path) for inputs that cannot be used,
    AggregationError for anything else.
    """
    bytes_read = 0
    arrays = 0
    with ExitStack() as stack:
        opened = _open_inputs(inputs, stack)
        base = _open_template(template, stack)
        names = float_datasets(base)
        with atomic_target(dest, tmp_dir, large=True) as tmp, h5py.File(tmp, "w") as out:
            copy_layout(base, out, names)
            for name in names:
                like, target = base[name], out[name]
                sources = [_input_dataset(source, name, like) for source in opened]
                selections = slabs(like.shape)
                largest = slab_shape(like.shape, selections[0])
                buffer = np.empty(largest, like.dtype)  # one input's slab, as stored
                sums = np.empty(largest, np.float64)
                result = np.empty(largest, like.dtype)
                for selection in selections:
                    if cancel is not None and cancel.is_set():
                        raise ShuttingDown("aggregation cancelled: shutting down")
                    rows = slab_shape(like.shape, selection)[:1] if selection else ()
                    total = sums[: rows[0]] if rows else sums
                    # The first two inputs start the float64 sum in one pass (the
                    # memory traffic is what costs: no zeros pass, no cast copy);
                    # ``result`` holds the second until it holds the result.
                    parts = zip(sources, opened, strict=True)
                    first = _read_input(buffer, *next(parts), selection)
                    if len(sources) > 1:
                        second = _read_input(result, *next(parts), selection)
                        np.add(first, second, out=total, dtype=np.float64)
                    else:
                        total[...] = first
                    for source, opened_file in parts:
                        total += _read_input(buffer, source, opened_file, selection)
                    bytes_read += len(sources) * first.nbytes
                    current = _read_template(buffer, like, template, selection)
                    values = result[: rows[0]] if rows else result

                    with np.errstate(over="ignore", invalid="ignore"):  # tested just below
                        finish(total, current, values)
                    # NaN or Inf in any input, or a result too large for the dtype,
                    # makes the values' sum non-finite: one cheap test per slab (on
                    # the result, in its own dtype), the exact search only if it fails.
                    if not np.isfinite(values.sum()) and not np.all(np.isfinite(values)):
                        raise _non_finite(name, opened, sources, like, template, selection)
                    target.write_direct(values, dest_sel=selection or None)
                arrays += 1
            # Last, before the rename publishes anything: an input written to while
            # it was read may have given bytes nobody checked.
            changed = {
                str(source.source.path): f"{source.source.path}: aggregate checkpoint "
                "changed while it was being averaged"
                for source in opened
                if source.changed()
            }
            if changed:
                raise ContributionsRefused(changed)
    return arrays, bytes_read


def aggregate(
    checkpoint: Path,
    contributions: Sequence[Contribution],
    tmp_dir: Path,
    cancel: threading.Event | None = None,
) -> AggregationResult:
    """Replace ``checkpoint`` by the FedAvg of ``contributions``; raise AggregationError.

    On any error (or when ``cancel`` is set) the checkpoint is left untouched.
    Contributions that cannot be used (their files changed since their check)
    are refused with ContributionsRefused, keyed by selector.
    """
    if not contributions:
        raise AggregationError("no selector aggregates to average")
    started = time.perf_counter()
    total_weight = sum(c.weight for c in contributions)

    def finish(total: np.ndarray, current: np.ndarray, out: np.ndarray) -> None:
        total /= total_weight
        np.add(total, current, out=out, casting="same_kind")

    inputs = [c.checkpoint for c in contributions]
    try:
        arrays, bytes_read = sum_into(checkpoint, inputs, checkpoint, tmp_dir, finish, cancel)
    except ContributionsRefused as refused:
        selector_of = {str(c.checkpoint.path): c.selector for c in contributions}
        reasons = {selector_of[path]: reason for path, reason in refused.reasons.items()}
        raise ContributionsRefused(reasons) from None
    return AggregationResult(
        arrays=arrays,
        bytes_read=bytes_read,
        total_weight=total_weight,
        seconds=time.perf_counter() - started,
    )
