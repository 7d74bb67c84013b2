"""FedAvg over HDF5 checkpoints: ``w_new = w + (sum_s A_s) / (sum_s N_s)``.

Pure numeric work on files, run in a worker thread (``trio.to_thread``) so the
event loop keeps answering RPCs. It does not assume a Keras layout: which
datasets are weight arrays, and how each dtype is decoded, summed and
encoded, is decided by :mod:`.weights` (the checkpoint's *plan*).

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
  batch counts lose digits in float32; complex128 and long double for those
  types) and the result is written in each dataset's own encoding.
* Nothing touches the global checkpoint until the new file is complete and
  on disk; then one rename publishes it (see :func:`layout.atomic_target`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import AggregationError, CheckpointError, ShuttingDown, os_error_text
from .atomic import atomic_target
from .checkpoint import open_checkpoint
from .weights import DTYPE_ATTRIBUTE, Encoding, Weight, accepts, encoding_of, read_plan

__all__ = [
    "SLAB_BYTES",
    "AggregationResult",
    "Aggregator",
    "Contribution",
    "Finish",
    "aggregate",
    "check_contribution",
    "read_weight",
    "slabs",
    "sum_into",
]

__all__: list[str] = []

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


def _open_h5(path: Path, stack: ExitStack, what: str) -> h5py.File:
    if not path.exists():
        raise AggregationError(f"{path}: {what} is missing")
    try:
        return stack.enter_context(h5py.File(path, "r"))
    except OSError as error:
        raise AggregationError(f"{path}: {what} is not a readable HDF5 file ({error})") from None


class _Source:
    """One input's dataset of a weight array, with its encoding and file (for messages)."""

    __slots__ = ("dataset", "encoding", "path")

    def __init__(self, dataset: h5py.Dataset, encoding: Encoding, path: Path) -> None:
        self.dataset, self.encoding, self.path = dataset, encoding, path


def _matching(file: h5py.File, weight: Weight, path: Path) -> _Source:
    """An aggregate's dataset of ``weight``, checked against its shape and encoding."""
    name = weight.name
    dataset = file.get(name)
    if not isinstance(dataset, h5py.Dataset):
        raise AggregationError(f"{path}: dataset {name!r} is missing")
    if dataset.shape != weight.shape:
        raise AggregationError(
            f"{path}: dataset {name!r} has shape {dataset.shape}, expected {weight.shape}"
        )
    try:
        encoding = encoding_of(dataset)
    except ValueError:
        encoding = None
    if encoding is None or not accepts(weight.encoding, encoding):
        given = encoding.name if encoding is not None else str(dataset.dtype)
        raise AggregationError(
            f"{path}: dataset {name!r} has dtype {given}, expected {weight.encoding.name}"
        )
    return _Source(dataset, encoding, path)


#: Arrays are streamed in slabs of about this many bytes (in float64): memory
#: stays bounded by a few slabs, whatever the size of the largest array.
SLAB_BYTES = 8 * 2**20


def slabs(shape: tuple[int, ...], itemsize: int = 8) -> list[tuple[slice, ...]]:
    """Selections covering an array of ``shape`` in row slabs of about SLAB_BYTES.

    ``itemsize`` is the bytes per value of the accumulator (8: float64).
    """
    if not shape:
        return [()]
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, SLAB_BYTES // max(row_bytes, 1))
    return [(slice(start, min(start + step, shape[0])),) for start in range(0, shape[0], step)]


def _slab_shape(shape: tuple[int, ...], selection: tuple[slice, ...]) -> tuple[int, ...]:
    if not selection:
        return shape
    rows = selection[0]
    return (rows.stop - rows.start, *shape[1:])


def _read_into(
    buffer: np.ndarray,
    dataset: h5py.Dataset,
    path: Path,
    selection: tuple[slice, ...],
    error: type[AggregationError] = AggregationError,
) -> np.ndarray:
    """Read ``dataset[selection]`` into (the leading rows of) ``buffer``; return that view."""
    rows = buffer[: selection[0].stop - selection[0].start] if selection else buffer
    try:
        dataset.read_direct(rows, source_sel=selection or None)
    except OSError as reason:
        raise error(f"{path}: dataset {dataset.name!r} cannot be read ({reason})") from None
    return rows


def _copy_attrs(source: h5py.HLObject, dest: h5py.HLObject, skip: Sequence[str] = ()) -> None:
    """Every attribute, with its own shape and HDF5 type (not re-guessed from the value)."""
    for key in source.attrs:
        if key in skip:
            continue
        spec = source.attrs.get_id(key)
        dest.attrs.create(key, source.attrs[key], shape=spec.shape, dtype=spec.dtype)


def _copy_layout(
    source: h5py.File, dest: h5py.File, weights: Mapping[str, Encoding | None]
) -> dict[str, h5py.Dataset]:
    """Make ``dest`` like ``source`` except that the datasets ``weights`` are created empty.

    They keep their shape and creation properties (chunking, filters, fill
    value), so the caller writes each value once; a dataset mapped to an
    encoding (not None: a wider upload, see :func:`.weights.upload_encoding`)
    gets that type, without Keras' opaque ``dtype`` tag. Returns the created
    datasets by name.
    """
    _copy_attrs(source, dest)
    created: dict[str, h5py.Dataset] = {}

    def visit(name: str, obj: h5py.HLObject) -> None:
        if isinstance(obj, h5py.Group):
            _copy_attrs(obj, dest.create_group(name))
        elif name in weights:
            dataset_id, encoding = obj.id, weights[name]
            dataset = created[name] = h5py.Dataset(
                h5py.h5d.create(
                    dest.id,
                    name.encode(),
                    dataset_id.get_type()
                    if encoding is None
                    else h5py.h5t.py_create(encoding.stored),
                    dataset_id.get_space(),
                    dcpl=dataset_id.get_create_plist(),
                )
            )
            _copy_attrs(obj, dataset, skip=() if encoding is None else (DTYPE_ATTRIBUTE,))
        else:
            dest.copy(obj, name)

    source.visititems(visit)
    return created


#: Turns the float64 sum of the inputs over one slab into the values to write:
#: ``finish(sum, template_values, out)`` fills ``out`` (the dataset's dtype,
#: cast by the last ufunc, no extra pass) and may work in place on ``sum``.
Finish = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


def _non_finite(sources: Sequence[_Source], selection: tuple[slice, ...]) -> str:
    """Which files hold NaN or Inf in ``selection`` (only run once a slab failed the test)."""
    culprits = [
        str(source.path)
        for source in sources
        if not np.all(np.isfinite(source.encoding.decode(np.asarray(source.dataset[selection]))))
    ]
    return ", ".join(culprits) or "the result (overflow of the dtype)"


def sum_into(
    template: Path,
    inputs: Sequence[Path],
    dest: Path,
    tmp_dir: Path,
    finish: Finish,
    cancel: threading.Event | None = None,
    encode: Callable[[Encoding], Encoding] | None = None,
) -> tuple[int, int]:
    """Write ``dest``: ``template``'s layout whose weight arrays hold ``finish(sum)``.

    ``sum`` is the sum (in the accumulator's dtype) of the same weight over
    ``inputs``, each checked against the template's shape and encoding and
    for NaN/Inf, computed slab by slab. Each weight is written in its own
    encoding, or in ``encode(its encoding)``. ``dest`` is replaced atomically,
    and only if everything succeeded (it may be ``template`` itself). Returns
    (arrays written, input bytes read). A problem with ``template`` itself is
    a CheckpointError (CheckpointLocked while another process holds it).
    """
    bytes_read = 0
    with ExitStack() as stack:
        files = [_open_h5(path, stack, "aggregate checkpoint") for path in inputs]
        base = open_checkpoint(template, stack)
        plan = read_plan(base, template)
        outputs = {w.name: encode(w.encoding) if encode else w.encoding for w in plan}
        changed = {w.name: outputs[w.name] if outputs[w.name] != w.encoding else None for w in plan}
        with atomic_target(dest, tmp_dir, large=True) as tmp, h5py.File(tmp, "w") as out:
            targets = _copy_layout(base, out, changed)
            for weight in plan:
                sources = [
                    _matching(file, weight, path) for file, path in zip(files, inputs, strict=True)
                ]
                like = _Source(base[weight.name], weight.encoding, template)
                bytes_read += _sum_weight(
                    weight,
                    like,
                    sources,
                    targets[weight.name],
                    outputs[weight.name],
                    finish,
                    cancel,
                )
    return len(plan), bytes_read


def _sum_weight(
    weight: Weight,
    like: _Source,
    sources: Sequence[_Source],
    target: h5py.Dataset,
    output: Encoding,
    finish: Finish,
    cancel: threading.Event | None,
) -> int:
    """Write ``target`` = ``finish(sum of sources, like)``, slab by slab; return bytes read."""
    selections = slabs(weight.shape, weight.encoding.accumulator.itemsize)
    largest = _slab_shape(weight.shape, selections[0])
    sums = np.empty(largest, weight.encoding.accumulator)
    result = np.empty(largest, output.stored)
    buffers: dict[tuple[np.dtype, bool], np.ndarray] = {}  # read buffers, by stored dtype

    def read(source: _Source, selection: tuple[slice, ...], spare: bool = False) -> np.ndarray:
        """Read one slab of ``source``; ``spare``: while the first input's slab is in use.

        The spare goes to ``result`` (it holds nothing yet) when the dtypes allow.
        """
        if spare and source.encoding.stored == output.stored:
            buffer = result
        else:
            key = (source.encoding.stored, spare)
            if key not in buffers:
                buffers[key] = np.empty(largest, source.encoding.stored)
            buffer = buffers[key]
        error = CheckpointError if source is like else AggregationError
        raw = _read_into(buffer, source.dataset, source.path, selection, error)
        return source.encoding.decode(raw)

    bytes_read = 0
    for selection in selections:
        if cancel is not None and cancel.is_set():
            raise ShuttingDown("aggregation cancelled: shutting down")
        rows = _slab_shape(weight.shape, selection)[:1] if selection else ()
        total = sums[: rows[0]] if rows else sums
        # The first two inputs start the sum in one pass (the memory traffic is
        # what costs: no zeros pass, no cast copy); ``result`` holds the second
        # until it holds the result.
        first = read(sources[0], selection)
        if len(sources) > 1:
            second = read(sources[1], selection, spare=True)
            np.add(first, second, out=total, dtype=total.dtype)
        else:
            total[...] = first
        for source in sources[2:]:
            total += read(source, selection)
        bytes_read += sum(first.size * source.encoding.stored.itemsize for source in sources)
        current = read(like, selection)
        stored = result[: rows[0]] if rows else result
        values = output.decode(stored)

        with np.errstate(over="ignore", invalid="ignore"):  # tested just below
            finish(total, current, values)

        # NaN or Inf in any input, or a result too large for the dtype, makes
        # the values' sum non-finite: one cheap test per slab (on the result,
        # in its own dtype), the exact search only if it fails.
        if not np.isfinite(values.sum()) and not np.all(np.isfinite(values)):
            where = _non_finite([*sources, like], selection)
            raise AggregationError(f"dataset {weight.name!r} contains NaN or Inf in {where}")
        target.write_direct(stored, dest_sel=selection or None)
    return bytes_read


def aggregate(
    checkpoint: Path,
    contributions: Sequence[Contribution],
    tmp_dir: Path,
    cancel: threading.Event | None = None,
) -> AggregationResult:
    """Replace ``checkpoint`` by the FedAvg of ``contributions``; raise AggregationError.

    On any error (or when ``cancel`` is set) the checkpoint is left untouched.
    Errors of the checkpoint itself, including a new one that cannot be
    written (a full or read-only disk), are CheckpointError.
    """
    if not contributions:
        raise AggregationError("no selector aggregates to average")
    started = time.perf_counter()
    total_weight = sum(read_weight(c.weight) for c in contributions)

    def finish(total: np.ndarray, current: np.ndarray, out: np.ndarray) -> None:
        total /= total_weight
        np.add(total, current, out=out, casting="same_kind")

    inputs = [c.checkpoint for c in contributions]
    try:
        arrays, bytes_read = sum_into(checkpoint, inputs, checkpoint, tmp_dir, finish, cancel)
    except OSError as error:  # reading errors are AggregationErrors: this is the writing
        raise CheckpointError(
            f"cannot write the new global checkpoint {checkpoint} (through {tmp_dir}): "
            f"{os_error_text(error)}"
        ) from None
    return AggregationResult(
        arrays=arrays,
        bytes_read=bytes_read,
        total_weight=total_weight,
        seconds=time.perf_counter() - started,
    )


def check_contribution(plan: Sequence[Weight], contribution: Contribution) -> None:
    """Raise AggregationError unless a selector's files can be averaged into a checkpoint.

    ``plan`` is the checkpoint's weight arrays (read once, at start-up: the
    global file itself is not opened here, so another process's lock on it
    never makes a selector look bad). Run when the selector reports, so that
    one bad selector is rejected on its own (the round goes on with the
    others) instead of failing the whole aggregation later. It reads every
    array once: NaN and Inf hide anywhere.
    """
    read_weight(contribution.weight)
    path = contribution.checkpoint
    with ExitStack() as stack:
        aggregate_file = _open_h5(path, stack, "aggregate checkpoint")
        for weight in plan:
            source = _matching(aggregate_file, weight, path)
            selections = slabs(weight.shape, source.encoding.stored.itemsize)
            buffer = np.empty(_slab_shape(weight.shape, selections[0]), source.encoding.stored)
            for selection in selections:
                part = source.encoding.decode(_read_into(buffer, source.dataset, path, selection))
                if not np.all(np.isfinite(part)):
                    raise AggregationError(f"dataset {weight.name!r} contains NaN or Inf in {path}")
