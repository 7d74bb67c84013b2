"""The round's average over HDF5 checkpoints, streamed, in one pass.

FedAvg, ``w_new = w + (sum_s A_s) / (sum_s N_s)``, or the configured
strategy (:mod:`..core.strategy`).

Pure numeric work on files, run in a worker thread (``trio.to_thread``) so the
event loop keeps answering RPCs. It does not assume a Keras layout: which
datasets are weight arrays, and how each dtype is decoded, summed and
encoded, is decided by :mod:`.weights` (the checkpoint's *plan*).

Each slab of each weight array goes through the same three steps: the
selectors' inputs are combined into ``D``, the round's mean update (a
weighted sum divided by the total weight, or a median or trimmed mean of
the clipped mean updates); ``D`` is a buffer of its own, which differential
privacy perturbs (Gaussian noise added to the sum, which is then divided by
the fixed CHECKIN_LIMIT: :mod:`..core.privacy`); the server optimizer then
turns ``D``, the current weights and its state (``m``, ``v``, read and
written slab by slab:
:mod:`.strategy_state`) into the new weights. With the default settings
that is ``w + D`` with the very operations the Go system's FedAvg needs.

How it is laid out, and why:

* The new checkpoint is the old one's layout with new float values: groups,
  attributes (with their own HDF5 types), non-float datasets (copied by
  HDF5) and each float dataset's creation properties (chunking, compression,
  fill value) are reproduced, and each float dataset's values are written
  exactly once. (A byte copy of the old file overwritten in place keeps the
  layout too, but writes every value twice and reads the old ones back: at
  K = 2 that was a quarter of the time.)
* Reads go straight into one preallocated buffer per array and the result is
  computed into another, so a slab costs no allocation. A plain dataset
  (contiguous, uncompressed: what Keras writes) is read with ``preadv`` at
  its checked file offset and the result written with ``pwrite``
  (:mod:`.plain`), whatever the strategy. An input stored any other way
  (chunked, filtered, another byte order: a selector chooses) is first copied,
  each chunk read and unfiltered once, into a plain file of our own in the
  tmp folder (:mod:`.plain_copy`), removed when the pass ends, and read like
  the others; read in C-order slabs through h5py, a chunk was read once per
  slab that wanted part of it (10 to 300 times). Inputs are located (and
  copied) one open file at a time and read through a bounded pool of
  descriptors, so open files do not grow with K. Where a copy cannot be
  written (our disk is full, or it would leave less than
  :func:`.plain_copy.kept_free` free), that input stays open as an HDF5 file
  and is read through h5py, in whole rows, slowly: THROUGH_HDF5_MAX inputs
  at most, beyond which the pass fails as our disk's fault (CheckpointError).
  The global checkpoint, if not plain, is read through h5py too (its layout
  is the operator's), and the result written with ``write_direct``. The
  optimizer's moments are read and written like the checkpoint
  (:mod:`.strategy_state`).
* Weight arrays are independent: every strategy but differential privacy's
  noise (drawn in one order) and the median and trimmed mean (one work
  stack) computes them in two lanes (threads, one per core, see
  :mod:`.lanes`), each taking the next array; ``preadv``, ``pwrite`` and numpy
  release the GIL. Within a lane, an array's slabs and inputs are read in
  order, into buffers small enough to stay in the processor's cache.

* One slab at a time: for each dataset we hold a float64 accumulator slab and
  one input slab (the optimizer's moments add a few more slabs), never K
  whole models, so memory is bounded by the largest array plus a constant,
  whatever K is. A slab is whole rows where a row fits in one, else cut
  within rows (:mod:`.slab`), unless a source of the array is read through
  h5py (a global checkpoint not plain, an input without room for its copy:
  HDF5 would read a chunk once per slab in it); such an array is held a row
  at a time, as much as four times its size for one row. A copy holds one
  block of whole chunks (:data:`.plain_copy.BLOCK_BYTES`) and HDF5 one chunk.
  A median or trimmed mean needs all K inputs of
  a slab at once: its slabs hold K times fewer values (one at least), so its
  memory stays about a slab's for any K up to SLAB_BYTES / 8.
* Sums are accumulated in float64 (K aggregates of float32 values weighted by
  batch counts lose digits in float32; complex128 and long double for those
  types) and the result is written in each dataset's own encoding.
* Nothing touches the global checkpoint until the new file is complete and
  on disk; then one rename publishes it (see :func:`.atomic.atomic_target`).

The inputs are untrusted files (a selector's aggregate, a client's upload):
each is opened and each of its datasets reached by the rules of
``untrusted.py``. For the coordinator they have passed their check already
(``contribution.py``, in a worker process); what could still go wrong is a
file changed since. An input that is not the file that was checked, or is
written to while it is read, is refused (:class:`ContributionsRefused`)
before anything is published, and the caller averages the others.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ..core.strategy import Combination, Strategy
from ..errors import (
    AggregationError,
    CheckpointError,
    ContributionError,
    ContributionsRefused,
    ShuttingDown,
    os_error_text,
)
from .atomic import atomic_target
from .checkpoint import open_checkpoint
from .hdf5_fd import open_own
from .lanes import LANES, Halt, in_lanes
from .pass_control import PassControl
from .plain import (
    DESCRIPTORS,
    Descriptors,
    Extent,
    allocated_early,
    extent_of,
    read_slab,
    reserve,
    write_slab,
)
from .plain_copy import copy_plain
from .slab import Selection, largest_slab, leading, slab_shape, slabs
from .untrusted import (
    CHUNK_MAX_BYTES,
    OURS,
    Opened,
    OwnShortage,
    UntrustedFile,
    dataset_at,
    raise_if_own_shortage,
)
from .weights import DTYPE_ATTRIBUTE, Encoding, Weight, read_plan

if TYPE_CHECKING:  # strategy_state reads and writes slabs as this module cuts them
    from .strategy_state import Moments, StateUpdate

log = logging.getLogger(__name__)

__all__ = [
    "AggregationResult",
    "Aggregator",
    "Contribution",
    "Finish",
    "ServerUpdate",
    "aggregate",
    "read_into",
    "sum_into",
]


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
    #: ``||A_s||^2`` over all weight arrays, when the check measured it (for clipping).
    square_norm: float | None = None
    #: Where each weight array's values lie and how they are encoded, by name, when
    #: all are plain (found by the check, in its worker process): the aggregation
    #: then reads them with ``preadv`` without parsing the file again; else None.
    plain: Mapping[str, tuple[Extent, Encoding]] | None = None


@dataclass(frozen=True)
class AggregationResult:
    arrays: int
    bytes_read: int
    total_weight: int
    seconds: float


@dataclass(frozen=True)
class ServerUpdate:
    """What an aggregation computes from the sum of its inputs: ``strategy``, and the
    optimizer state it reads and writes (``state``: needed when the optimizer keeps
    moments). The default is the Go system's FedAvg."""

    strategy: Strategy = field(default_factory=Strategy)
    state: StateUpdate | None = None
    #: Where the differential privacy noise comes from (None: a generator seeded by the
    #: operating system's entropy, drawn anew for each aggregation). Tests seed one.
    noise: np.random.Generator | None = None

    def __post_init__(self) -> None:
        if bool(self.strategy.optimizer.moments) != (self.state is not None):
            raise ValueError("the optimizer state is needed exactly when the optimizer keeps one")


#: The signature of :func:`aggregate`, for code that takes one as a parameter.
Aggregator = Callable[
    [Path, Sequence[Contribution], Path, PassControl | None, ServerUpdate],
    AggregationResult,
]


class _Source:
    """One weight array of an input or of the global checkpoint: its h5py dataset, or
    where its bytes lie (a plain one, read with ``preadv`` from the descriptor ``fd_of()``
    gives); its encoding, and its file (``file``, for an input read so; ``path``: for
    messages)."""

    __slots__ = ("dataset", "encoding", "extent", "fd_of", "file", "name", "opened", "path")

    def __init__(
        self,
        dataset: h5py.Dataset | None,
        encoding: Encoding,
        path: Path,
        opened: Opened | None,
        plain: tuple[str, Callable[[], int], Extent] | None = None,
        file: UntrustedFile | None = None,
    ) -> None:
        self.dataset, self.encoding, self.path, self.opened = dataset, encoding, path, opened
        self.file = file
        self.fd_of: Callable[[], int] | None = None
        self.extent: Extent | None = None
        if plain is not None:
            self.name, self.fd_of, self.extent = plain
        else:
            assert dataset is not None
            self.name = dataset.name

    @property
    def untrusted(self) -> bool:
        """An input (refused alone when it fails), not the global checkpoint."""
        return self.opened is not None or self.file is not None


class _PlainInput:
    """An input whose weight arrays are all plain (see :mod:`.plain`), or a plain copy of
    one (:mod:`.plain_copy`): no HDF5 file is kept open for it, only its arrays' extents
    in ``file``, which carries the identity it had; ``path`` is the input's, for messages
    and refusals (the copy's file is ours)."""

    __slots__ = ("encodings", "extents", "file", "path")

    def __init__(self, file: UntrustedFile, path: Path | None = None) -> None:
        self.file = file
        self.path = file.path if path is None else path
        self.extents: dict[str, Extent] = {}
        self.encodings: dict[str, Encoding] = {}

    @classmethod
    def checked(cls, contribution: Contribution) -> _PlainInput | UntrustedFile:
        """What ``contribution``'s check found, if its arrays are plain; else its file."""
        if contribution.plain is None:
            return contribution.checkpoint
        located = cls(contribution.checkpoint)
        for name, (extent, encoding) in contribution.plain.items():
            located.extents[name], located.encodings[name] = extent, encoding
        return located

    def fits(self, plan: Sequence[Weight]) -> bool:
        """Whether its extents are those of ``plan``'s arrays (the plan its check used)."""
        return [w.name for w in plan] == list(self.extents) and all(
            self.extents[w.name].shape == w.shape
            and self.extents[w.name].nbytes
            == self.encodings[w.name].stored.itemsize * math.prod(w.shape)
            for w in plan
        )


#: Inputs without room for their plain copy that a pass reads through HDF5, at most.
#: Each stays open as an HDF5 file (a descriptor and about 0.65 MB) for the whole pass:
#: without a bound, K = 100 such inputs in a process allowed 100 open files had the last
#: ten refused ("Too many open files", blamed on their selectors), and a disk full of
#: K = 2,000 copies would hold 2,000 files open. Beyond it the pass fails as our disk's
#: fault (CheckpointError), refusing no selector.
THROUGH_HDF5_MAX = 16


@dataclass
class _Copies:
    """Where the pass copies its inputs that are not plain (:mod:`.plain_copy`), the
    stack that removes the copies when it ends, and how many inputs it reads through
    HDF5 for want of room (at most THROUGH_HDF5_MAX)."""

    tmp_dir: Path
    stack: ExitStack
    cancel: PassControl
    through_hdf5: int = 0


def _locate(source: UntrustedFile, plan: Sequence[Weight], copies: _Copies) -> _PlainInput | Opened:
    """Open ``source`` and reach each weight by the rules of untrusted files; if all are
    plain, close it again and keep their extents, else copy them into a plain file of our
    own and read that. Where the copy cannot be written (our disk is full), the file is
    kept open and read through h5py, each chunk once per slab it spans."""
    with ExitStack() as here:
        # A chunk cache of one chunk: a copy reads whole chunks, each in one call.
        opened = here.enter_context(source.open_hdf5("aggregate checkpoint", None, CHUNK_MAX_BYTES))
        located = _PlainInput(replace(source, identity=opened.identity))
        found = {weight.name: _input(opened, weight) for weight in plan}
        for weight, array in zip(plan, found.values(), strict=True):
            assert array.dataset is not None
            try:
                extent = extent_of(
                    array.dataset, array.encoding.stored, opened.identity.size, source.path
                )
            except ContributionError as error:
                raise _refused(source.path, weight.name, error) from None
            if extent is None:
                return _copied(opened, found, copies, here)
            located.extents[weight.name], located.encodings[weight.name] = extent, array.encoding
    return located


def _copied(
    opened: Opened, found: Mapping[str, _Source], copies: _Copies, here: ExitStack
) -> _PlainInput | Opened:
    """``opened``'s arrays ``found`` (by weight name), copied into a plain file (see
    :func:`_locate`)."""
    path = opened.source.path
    arrays = [(name, s.dataset, s.encoding.stored) for name, s in found.items()]
    try:
        copy = copies.stack.enter_context(copy_plain(arrays, copies.tmp_dir, path, copies.cancel))
    except ContributionError as error:
        raise ContributionsRefused({str(path): str(error)}) from None
    except OSError as error:
        # Out of descriptors is not out of room: reading through HDF5 would hold one more.
        raise_if_own_shortage(error)  # the pass fails as the coordinator's (see aggregate)
        if copies.through_hdf5 == THROUGH_HDF5_MAX:
            raise CheckpointError(
                f"no room in {copies.tmp_dir} for a plain copy of {path} "
                f"({os_error_text(error)}), nor of {THROUGH_HDF5_MAX} other aggregates stored "
                "in chunks, which are read through HDF5 instead (each held open for the "
                f"whole pass, {THROUGH_HDF5_MAX} at most): free space on the file system of "
                f"{copies.tmp_dir}; the global checkpoint is kept as it was"
            ) from None
        copies.through_hdf5 += 1
        log.warning(
            "%s: no plain copy of this aggregate could be written in %s (%s); it is read "
            "through HDF5 instead, each chunk once per slab that needs part of it (slower)",
            path, copies.tmp_dir, os_error_text(error),
        )  # fmt: skip
        here.close()  # open again without a chunk cache: K of them would not be flat in K
        again = replace(opened.source, identity=opened.identity)
        reopening = again.open_hdf5("aggregate checkpoint")
        return copies.stack.enter_context(copies.cancel.closed_waiting(path, reopening))
    if opened.changed():
        raise ContributionsRefused(
            {str(path): f"{path}: aggregate checkpoint changed while it was being copied"}
        )
    located = _PlainInput(copy.file, path)
    for name, array in found.items():
        located.extents[name], located.encodings[name] = copy.extents[name], array.encoding
    return located


def _open_inputs(
    inputs: Sequence[UntrustedFile | _PlainInput], plan: Sequence[Weight], copies: _Copies
) -> list[_PlainInput | Opened]:
    """Locate every input, one open file at a time (unless its check found its plain
    extents), copying those that are not plain; refuse all that cannot be used, at once
    (one retry, not one per input)."""
    located: list[_PlainInput | Opened] = []
    refused: dict[str, str] = {}
    for source in inputs:
        if isinstance(source, _PlainInput):
            if source.fits(plan):
                located.append(source)
                continue
            source = source.file
        try:
            with copies.cancel.waiting_on(source.path, in_hdf5=True):
                located.append(_locate(source, plan, copies))
        except ContributionError as error:
            refused[str(source.path)] = str(error)
        except ContributionsRefused as error:
            refused.update(error.reasons)
    if refused:
        raise ContributionsRefused(refused)
    return located


def _refused(path: Path, name: str, error: Exception) -> ContributionsRefused:
    """Input ``path`` refused because dataset ``name`` of it could not be used."""
    if isinstance(error, ContributionError):
        return ContributionsRefused({str(path): str(error)})
    reason = f"{path}: dataset {name!r} cannot be read ({type(error).__name__}: {error})"
    return ContributionsRefused({str(path): reason})


def _input(opened: Opened, weight: Weight) -> _Source:
    """An input's dataset of ``weight``, by the rules of untrusted files; refused otherwise."""
    path = opened.source.path
    try:
        dataset, encoding = dataset_at(opened.file, weight, path)
    except (ContributionError, KeyError, OSError, RuntimeError, TypeError, ValueError) as error:
        raise _refused(path, weight.name, error) from None
    return _Source(dataset, encoding, path, opened)


def read_into(buffer: np.ndarray, dataset: h5py.Dataset, selection: Selection) -> np.ndarray:
    """Read ``dataset[selection]`` into the leading values of ``buffer``; return that view."""
    values = leading(buffer, slab_shape(dataset.shape, selection))
    dataset.read_direct(values, source_sel=selection or None)
    return values


def _read(buffer: np.ndarray, source: _Source, selection: Selection) -> np.ndarray:
    """One slab of ``source``, decoded: an input's failure refuses it, the template's is
    a CheckpointError."""
    try:
        if source.extent is not None:
            assert source.fd_of is not None
            raw = read_slab(source.fd_of(), source.extent, selection, buffer, source.path)
        else:
            assert source.dataset is not None
            raw = read_into(buffer, source.dataset, selection)
    except OwnShortage:
        raise  # reopening a plain input: the pass fails as the coordinator's (see aggregate)
    except (ContributionError, OSError) as error:
        if source.untrusted:
            raise _refused(source.path, source.name, error) from None
        raise CheckpointError(
            f"{source.path}: dataset {source.name!r} cannot be read ({error})"
        ) from None
    return source.encoding.decode(raw)


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
                    dcpl=allocated_early(dataset_id.get_create_plist()),
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


def _non_finite(
    weight: Weight,
    sources: Sequence[_Source],
    like: _Source,
    selection: Selection,
    causes: str = "",
) -> AggregationError:
    """Which file holds NaN or Inf in ``selection`` (only run once a slab failed the test).

    An input is refused alone; NaN or Inf in the template, or nowhere (the
    result overflows its dtype), is a failure of the whole average.
    """
    name = weight.name

    def finite(source: _Source) -> bool:
        buffer = np.empty(slab_shape(weight.shape, selection), source.encoding.stored)
        return bool(np.all(np.isfinite(_read(buffer, source, selection))))

    refused = {
        str(source.path): f"{source.path}: dataset {name!r} contains NaN or Inf"
        for source in sources
        if not finite(source)
    }
    if refused:
        return ContributionsRefused(refused)
    if not finite(like):
        return AggregationError(f"dataset {name!r} contains NaN or Inf in {like.path}")
    return AggregationError(
        f"dataset {name!r} contains NaN or Inf in the result: the new weights overflow "
        f"{like.encoding.name}; check {causes}SERVER_LEARNING_RATE and the strategy's "
        "settings (STRATEGY, TAU), or the selectors' updates"
    )


def sum_into(
    template: Path,
    inputs: Sequence[UntrustedFile],
    dest: Path,
    tmp_dir: Path,
    finish: Finish,
    cancel: PassControl | None = None,
    encode: Callable[[Encoding], Encoding] | None = None,
) -> tuple[int, int]:
    """Write ``dest``: ``template``'s layout whose weight arrays hold ``finish(sum)``.

    ``sum`` is the sum (in the accumulator's dtype) of the same weight over
    ``inputs``, each checked against the template's shape and encoding and
    for NaN/Inf, computed slab by slab. Each weight is written in its own
    encoding, or in ``encode(its encoding)``. ``dest`` is replaced atomically,
    and only if everything succeeded (it may be ``template`` itself). Returns
    (arrays written, input bytes read).

    Raises ContributionsRefused (keyed by path) for inputs that cannot be used
    (or were written to while read), CheckpointError for a problem with
    ``template`` itself (CheckpointLocked while another process holds it),
    AggregationError for anything else.
    """

    def apply(total: np.ndarray, current: np.ndarray, out: np.ndarray, *_: object) -> None:
        finish(total, current, out)

    return _rewrite(template, inputs, dest, tmp_dir, _Combine(), apply, cancel, encode)


#: Computes one slab of the result: ``step(combined, current, out, weight, selection)``
#: (``combined`` may be used as work space).
_Step = Callable[[np.ndarray, np.ndarray, np.ndarray, Weight, Selection], None]

#: Reads one slab of an input, decoded: ``read(source, selection, spare)``; ``spare``:
#: while the first input's slab is in use.
_Read = Callable[[_Source, Selection, bool], np.ndarray]


class _Combine:
    """How a slab's inputs become the values the step gets: ``D``, the round's mean update.

    By default ``sum_s c_s A_s / divisor`` (``c_s`` = ``scales``, all 1 without
    clipping; ``divisor`` 1: the bare sum, as the client's update needs).
    Without scales, the first two inputs start the sum in one pass (the memory
    traffic is what costs: no zeros pass, no cast copy); the second is read
    into the result's buffer, which holds nothing yet. With a robust
    ``combination``: the median or trimmed mean of the selectors' clipped mean
    updates ``c_s A_s / N_s`` (``weights``: ``N_s``), all K of a slab held at
    once (:attr:`holds`: the slabs are that many times smaller). With
    ``noise`` (standard deviation, generator): Gaussian noise is added to each
    coordinate of the sum before it is divided (differential privacy, where the
    divisor is the fixed CHECKIN_LIMIT), drawn in float64 into a slab of its own.
    """

    def __init__(
        self,
        scales: Sequence[float] | None = None,
        divisor: float = 1.0,
        robust: tuple[Combination, Sequence[int]] | None = None,
        noise: tuple[float, np.random.Generator] | None = None,
    ) -> None:
        self._scales = scales if scales is not None and any(c != 1 for c in scales) else None
        self._divisor = divisor
        self._robust = robust
        self._noise = noise
        self.holds = len(robust[1]) if robust else 1
        self._stack: np.ndarray | None = None
        self._drawn: np.ndarray | None = None

    def __call__(
        self,
        read: _Read,
        sources: Sequence[_Source],
        selection: Selection,
        total: np.ndarray,
        scratch: np.ndarray,
    ) -> np.ndarray:
        def load(index: int, spare: bool = False) -> np.ndarray:
            return read(sources[index], selection, spare)

        if self._robust is not None:
            return self._ordered(load, len(sources), total)
        first = load(0)
        if self._scales is not None:
            np.multiply(first, self._scales[0], out=total)
            for index in range(1, len(sources)):
                total += np.multiply(load(index), self._scales[index], out=scratch)
        elif len(sources) > 1:
            np.add(first, load(1, spare=True), out=total, dtype=total.dtype)
            for index in range(2, len(sources)):
                total += load(index)
        else:
            total[...] = first
        if self._noise is not None:
            self._add_noise(total, *self._noise)
        if self._divisor != 1:
            total /= self._divisor
        return total

    @property
    def shareable(self) -> bool:
        """Whether slabs may be combined by several threads at once: no work space kept
        between calls (the robust combinations' stack), no draws whose order matters."""
        return self._robust is None and self._noise is None

    @property
    def causes(self) -> str:
        """The settings of this combination that can make a result overflow (or "")."""
        if self._noise is None:
            return ""
        std = self._noise[0]
        return f"DP_NOISE_MULTIPLIER x DP_CLIP_NORM = {std:g} (the noise's standard deviation), "

    def _add_noise(self, total: np.ndarray, std: float, generator: np.random.Generator) -> None:
        """``total += N(0, std^2)``, one draw per coordinate, without allocating per slab."""
        if self._drawn is None or self._drawn.size < total.size:
            self._drawn = np.empty(total.size, np.float64)
        drawn = self._drawn[: total.size]
        generator.standard_normal(out=drawn)
        drawn *= std
        total += drawn.reshape(total.shape)

    def _ordered(
        self, load: Callable[[int], np.ndarray], count: int, total: np.ndarray
    ) -> np.ndarray:
        assert self._robust is not None
        combination, weights = self._robust
        size = count * total.size
        if self._stack is None or self._stack.size < size:
            self._stack = np.empty(size, total.dtype)
        # K rows of the slab's values, flat: the statistic is per coordinate, and a stack
        # of the slab's own shape would have one axis more than numpy sorts (32 at most,
        # as many as HDF5 allows), or be a row of numbers for a scalar.
        stack = self._stack[:size].reshape((count, total.size))
        for index in range(count):
            np.divide(load(index).reshape(-1), weights[index], out=stack[index])
            if self._scales is not None and self._scales[index] != 1:
                stack[index] *= self._scales[index]
        combination.combine(stack, total.reshape(-1))
        return total


def _rewrite(
    template: Path,
    inputs: Sequence[UntrustedFile | _PlainInput],
    dest: Path,
    tmp_dir: Path,
    combine: _Combine,
    step: _Step,
    cancel: PassControl | None = None,
    encode: Callable[[Encoding], Encoding] | None = None,
    moments: Callable[[], contextlib.AbstractContextManager[Moments | None]] | None = None,
) -> tuple[int, int]:
    """:func:`sum_into` with a given ``combine`` and ``step``; ``moments`` opens the
    optimizer's state (published tied to the new file, before ``dest`` is replaced).

    Every input is closed before anything is published, and from then on only the
    coordinator's own files are touched: a pass that ``cancel`` stops while it waits on
    an input's storage never publishes (see :mod:`.pass_control`).
    """
    control = PassControl() if cancel is None else cancel
    with ExitStack() as stack:
        stack.enter_context(control.emptied_is_stopped())  # exited last: sees all
        opened = open_checkpoint(template, stack)
        base = opened.file
        unchanged = _Unchanged(template, opened.fd)
        plan = read_plan(base, template)
        outputs = {w.name: encode(w.encoding) if encode else w.encoding for w in plan}
        changed = {w.name: outputs[w.name] if outputs[w.name] != w.encoding else None for w in plan}
        with (
            atomic_target(dest, tmp_dir, large=True) as tmp,
            (moments or contextlib.nullcontext)() as state,
        ):
            control.scratch(tmp)
            # Values are pwritten beside HDF5's own writes, unbuffered both (see .hdf5_fd):
            # core (the whole file in memory, written at close) would undo them.
            with open_own(tmp, "w") as written, ExitStack() as reading:
                out, out_fd = written.file, written.fd
                targets = _copy_layout(base, out, changed)
                reserve(out_fd, out.id.get_filesize())  # its arrays are allocated: all of it

                def average(weight: Weight, descriptors: Descriptors, halt: Halt) -> int:
                    return _write_weight(
                        weight,
                        _template(base, weight, unchanged),
                        [_source(source, weight, descriptors) for source in located],
                        _writer(targets[weight.name], outputs[weight.name].stored, out_fd, tmp),
                        outputs[weight.name],
                        combine,
                        step,
                        halt,
                    )

                if state is not None:
                    state.prepare(plan, control)
                # Once the new files' space is reserved: copies take what is left.
                located = _open_inputs(inputs, plan, _Copies(tmp_dir, reading, control))
                lanes = LANES if combine.shareable else 1  # noise is drawn in one order
                pools = [
                    reading.enter_context(closing(Descriptors(DESCRIPTORS // lanes, control)))
                    for _ in range(lanes)
                ]
                bytes_read = in_lanes(plan, average, pools, control)
                descriptors = pools[0]
                # Last, before the rename publishes anything: an input written to
                # while it was read may have given bytes nobody checked.
                looked = (_changed(source, descriptors, control) for source in located)
                written_to = {
                    str(path): f"{path}: aggregate checkpoint changed while it was being averaged"
                    for path, changed in looked
                    if changed
                }
                if written_to:
                    raise ContributionsRefused(written_to)
                reading.close()  # the inputs: nothing of theirs is waited on from here
                unchanged.check()
            control.publishing()
            if state is not None:
                state.publish(tmp)  # the new file is complete: the state names it
    return len(plan), bytes_read


class _Unchanged:
    """The global checkpoint as the pass opened it: written to in place or replaced since
    (the folder may be shared storage), the pass read a mix of two files, or would
    publish over another's: a CheckpointError before anything is published.

    Its size, modification time and inode tell, not its change time: the history's
    links to it (made and removed while a round runs) change that too.
    """

    def __init__(self, path: Path, fd: int) -> None:
        #: The file, the descriptor HDF5 reads it through, and its size as the pass opened it.
        self.path, self.fd = path, fd
        self._was = self._of(os.fstat(fd))
        self.size = self._was[2]

    @staticmethod
    def _of(status: os.stat_result) -> tuple[int, int, int, int]:
        return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns

    def check(self) -> None:
        try:
            now = self._of(os.stat(self.path))
        except FileNotFoundError:
            now = None
        if now is None or now[:2] != self._was[:2]:
            what = "replaced or removed"
        elif self._of(os.fstat(self.fd)) != self._was:
            what = "written to"
        else:
            return
        raise CheckpointError(
            f"{self.path}: the global checkpoint was {what} by another process while it "
            "was being averaged; the result is not published (run one coordinator per "
            "problem folder, and leave its initFiles to it)"
        )


#: Writes one slab of the result: ``write(values, selection)``.
_Write = Callable[[np.ndarray, Selection], None]


def _writer(target: h5py.Dataset, stored: np.dtype, fd: int, path: Path) -> _Write:
    """How a weight's result slabs go to ``target``: ``pwrite`` at its offset (a plain
    dataset, allocated at creation: see :func:`.plain.allocated_early`), else h5py."""
    extent = extent_of(target, stored, None, path)
    if extent is None:
        return lambda values, selection: target.write_direct(values, dest_sel=selection or None)
    return functools.partial(write_slab, fd, extent)


def _source(located: _PlainInput | Opened, weight: Weight, descriptors: Descriptors) -> _Source:
    """``located``'s array of ``weight``: read from its extent, or through h5py."""
    if isinstance(located, Opened):
        return _input(located, weight)
    plain = (
        weight.name,
        functools.partial(descriptors.get, located.file),
        located.extents[weight.name],
    )
    return _Source(None, located.encodings[weight.name], located.path, None, plain,
                   located.file)  # fmt: skip


def _template(base: h5py.File, weight: Weight, opened: _Unchanged) -> _Source:
    """The global checkpoint's array of ``weight``: read from its extent (through the
    descriptor HDF5 reads the file through, ``opened.fd``) if plain, else through h5py."""
    dataset = base[weight.name]
    path = opened.path
    try:
        extent = extent_of(dataset, weight.encoding.stored, opened.size, path)
    except ContributionError as error:
        raise CheckpointError(str(error)) from None
    if extent is None:
        return _Source(dataset, weight.encoding, path, None)
    return _Source(None, weight.encoding, path, None, (weight.name, lambda: opened.fd, extent))


def _changed(
    located: _PlainInput | Opened, descriptors: Descriptors, control: PassControl
) -> tuple[Path, bool]:
    """An input's path, and whether it was written to since it was first opened."""
    if isinstance(located, Opened):
        with control.waiting_on(located.source.path):
            return located.source.path, located.changed()
    return located.path, descriptors.changed(located.file)


def _write_weight(
    weight: Weight,
    like: _Source,
    sources: Sequence[_Source],
    write: _Write,
    output: Encoding,
    combine: _Combine,
    step: _Step,
    halt: Halt,
) -> int:
    """``write`` ``step(combine(sources), like)``, slab by slab; return bytes read."""
    accumulator = weight.encoding.accumulator
    itemsize = accumulator.itemsize * combine.holds
    # HDF5 reads a chunk whole for each slab that wants part of it (untrusted files get
    # no chunk cache): cut within rows, a chunk of one wide row spanning n slabs was read
    # n times per input (K = 10 of a (1, 4e6) array: 9 s against 0.9 s in whole rows).
    # Where any source is read through h5py (a chunked global checkpoint, an input
    # without room for its plain copy), slabs stay whole rows.
    whole_rows = like.extent is None or any(source.extent is None for source in sources)
    largest = largest_slab(weight.shape, itemsize, whole_rows=whole_rows)
    sums = np.empty(largest, accumulator)
    scratch = np.empty(largest, accumulator)
    result = np.empty(largest, output.stored)
    buffers: dict[tuple[np.dtype, bool], np.ndarray] = {}  # read buffers, by stored dtype

    def read(source: _Source, selection: Selection, spare: bool = False) -> np.ndarray:
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
        if not source.untrusted:
            return _read(buffer, source, selection)
        # A plain copy's file is ours: a wait on it is not its selector's doing.
        waited = source.path if source.file is None else source.file.path
        with halt.waiting_on(waited, in_hdf5=source.extent is None):
            return _read(buffer, source, selection)

    bytes_read = 0
    for selection in slabs(weight.shape, itemsize, whole_rows=whole_rows):
        if halt.is_set():
            raise ShuttingDown("aggregation cancelled: shutting down")
        shape = slab_shape(weight.shape, selection)
        combined = combine(read, sources, selection, leading(sums, shape), leading(scratch, shape))
        size = combined.size
        bytes_read += sum(size * source.encoding.stored.itemsize for source in sources)
        current = read(like, selection)
        stored = leading(result, shape)
        values = output.decode(stored)

        with np.errstate(over="ignore", invalid="ignore"):  # tested just below
            step(combined, current, values, weight, selection)
            # NaN or Inf in any input, or a result too large for the dtype, makes
            # the values' sum non-finite: one cheap test per slab (on the result,
            # in its own dtype), the exact search only if it fails.
            finite = np.isfinite(values.sum()) or np.all(np.isfinite(values))
        if not finite:
            raise _non_finite(weight, sources, like, selection, combine.causes)
        write(stored, selection)
    return bytes_read


class _ServerStep:
    """The optimizer's step on one slab, with its moments read and written around it
    (work space from the moments' buffers, per lane: several threads may step their own
    arrays at once)."""

    def __init__(self, strategy: Strategy) -> None:
        self._optimizer = strategy.optimizer
        self.moments: Moments | None = None

    def __call__(
        self,
        d: np.ndarray,
        current: np.ndarray,
        out: np.ndarray,
        weight: Weight,
        selection: Selection,
    ) -> None:
        if self.moments is None:
            self._optimizer.step(d, current, out)
            return
        state = {name: self.moments.read(weight, name, selection) for name in self.moments.names}
        scratch = self.moments.buffer(("scratch", d.dtype), d.shape)
        self._optimizer.step(d, current, out, state.get("m"), state.get("v"), scratch)
        for name, values in state.items():
            self.moments.write(weight, name, selection, values)


def aggregate(
    checkpoint: Path,
    contributions: Sequence[Contribution],
    tmp_dir: Path,
    cancel: PassControl | None = None,
    update: ServerUpdate | None = None,
) -> AggregationResult:
    """Replace ``checkpoint`` by the average of ``contributions`` (FedAvg, or ``update``'s
    strategy, whose optimizer state is rewritten in the same pass); raise AggregationError.

    On any error (or when ``cancel`` is set) the checkpoint is left untouched.
    Contributions that cannot be used (their files changed since their check)
    are refused with ContributionsRefused, keyed by selector. Errors of the
    checkpoint itself, including a new one that cannot be written (a full or
    read-only disk), are CheckpointError.
    """
    if not contributions:
        raise AggregationError("no selector aggregates to average")
    update = update or ServerUpdate()
    strategy = update.strategy
    if len(contributions) < strategy.combination.min_selectors:
        raise AggregationError(
            f"{strategy.combination.method} needs the updates of at least "
            f"{strategy.combination.min_selectors} selectors, not {len(contributions)}"
        )
    started = time.perf_counter()
    weights = [c.weight for c in contributions]
    total_weight = sum(weights)
    norms = [c.square_norm for c in contributions]
    if strategy.combination.clip_norm and None in norms:
        raise AggregationError("clipping needs the norm of every update (measured by its check)")
    scales = strategy.combination.clip_factors(norms, weights)  # type: ignore[arg-type]
    for contribution, scale, square in zip(contributions, scales, norms, strict=True):
        if scale < 1 and square is not None:
            log.info(
                "the mean update of %s (L2 norm %.6g) is clipped to SELECTOR_CLIP_NORM=%g",
                contribution.selector,
                math.sqrt(square) / contribution.weight,
                strategy.combination.clip_norm,
            )
    robust = (strategy.combination, weights) if strategy.combination.robust else None
    privacy = strategy.privacy
    if privacy is None:
        combine = _Combine(scales, total_weight, robust)
    else:  # the fixed denominator; weights are bounded by the round (see core.privacy)
        noise = (privacy.noise_std, update.noise or np.random.default_rng())
        combine = _Combine(None, privacy.denominator, None, noise)
    step = _ServerStep(strategy)

    @contextlib.contextmanager
    def moments() -> Iterator[Moments | None]:
        if update.state is None:
            yield None
            return
        with update.state.rewrite(tmp_dir) as step.moments:
            yield step.moments

    inputs = [_PlainInput.checked(c) for c in contributions]
    try:
        arrays, bytes_read = _rewrite(
            checkpoint, inputs, checkpoint, tmp_dir, combine, step, cancel, moments=moments
        )
    except ContributionsRefused as refused:
        selector_of = {str(c.checkpoint.path): c.selector for c in contributions}
        reasons = {selector_of[path]: reason for path, reason in refused.reasons.items()}
        raise ContributionsRefused(reasons) from None
    except OSError as error:  # reading errors are AggregationErrors: this is the writing,
        if error.errno in OURS:  # or the coordinator's own descriptors or memory ran out
            raise CheckpointError(
                f"the coordinator ran out of its own resources while averaging "
                f"({os_error_text(error)}): raise its RLIMIT_NOFILE or memory; the global "
                "checkpoint is kept as it was"
            ) from None
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
