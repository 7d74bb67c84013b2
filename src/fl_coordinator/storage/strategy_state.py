"""The server optimizer's state (``m``, ``v``): one file per kept round, tied to its checkpoint.

FedAvgM keeps ``m``, the adaptive strategies ``m`` and ``v``, each shaped
like the weights, from one round to the next. The state a round produces
is written *beside the checkpoint it belongs to* in the history:
``.coordinator/history/round-NNNNNN.state.h5``, with the groups ``m/`` and
``v/`` holding one dataset per weight array under the checkpoint's own names
(the checkpoint's layout), in :func:`state_encoding` (float32 for the usual
float32 weights, as every deep-learning optimizer keeps its moments in the
variable's own precision; at least float32 for 16-bit weights). It never
goes near ``initFiles/``, whose every file is sent to clients.

**Tied to its checkpoint.** A state file names the checkpoint it was
computed with: the inode, size and modification time of the new checkpoint
file, taken once that file is complete and before it is renamed into place
(a rename and a hard link keep all three). The order of the writes is: the
new checkpoint, complete, in ``.coordinator/tmp/``; its state, complete,
renamed into the history; then the checkpoint renamed over the global one.
At start-up the state used is the one that names the checkpoint in place
(:func:`paired_state`), so after a crash at any instant the coordinator never
pairs a checkpoint with another round's state: a state written for a
checkpoint that never made it into place names a file that no longer exists.
``rollback --round N`` links round N's kept checkpoint back into place, which
makes round N's state the paired one again. A checkpoint replaced by hand, or
a folder copied without keeping inode numbers, pairs with no state: the
optimizer starts again from ``m = 0``, ``v = tau^2``, with a warning.

**Changing STRATEGY is refused** (:func:`check_strategy`): the state paired
with the checkpoint says which strategy made it, and another one cannot use
it (FedAvgM's ``m`` is a sum, FedAdam's an average; FedAvg keeps none). A
forgotten setting (a restart without the config file falls back to
``fedavg``) would otherwise throw away the state of a long run silently; an
operator who means it removes the state files, and the new strategy starts
from its initial state. Other hyperparameters may change between runs
(learning-rate schedules are common): the state carries over, and the change
is logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from ..core.strategy import ServerOptimizer, Strategy
from ..errors import AggregationError, ConfigError, ContributionError, ProblemError
from .atomic import atomic_target
from .hdf5_fd import OwnFile, open_own
from .journal import history, kept_file
from .layout import Layout
from .pass_control import PassControl
from .plain import (
    Extent,
    allocated_early,
    extent_of,
    read_slab,
    reserve,
    write_slab,
)
from .plain_copy import copy_plain
from .slab import Selection, leading, slab_shape
from .untrusted import raise_if_own_shortage
from .weights import Encoding, Weight, upload_encoding

__all__ = [
    "STATE_SUFFIX",
    "CheckpointIdentity",
    "Moments",
    "StateUpdate",
    "check_fit",
    "check_strategy",
    "paired_state",
    "state_encoding",
    "state_path",
]

log = logging.getLogger(__name__)

#: A kept round's optimizer state: ``round-NNNNNN`` + this, in the history.
STATE_SUFFIX = ".state.h5"


def state_encoding(encoding: Encoding) -> Encoding:
    """How a moment of a weight stored as ``encoding`` is stored: the weight's own dtype,
    but at least float32 (``v`` holds squares: float16 loses them below 6e-8)."""
    return upload_encoding(encoding)


def state_path(layout: Layout, round_number: int) -> Path:
    return kept_file(layout, round_number, STATE_SUFFIX)


@dataclass(frozen=True)
class CheckpointIdentity:
    """Which checkpoint file a state belongs to: kept by renames and hard links.

    No device number: it changes when a network file system is mounted again.
    """

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> CheckpointIdentity:
        status = os.stat(path)
        return cls(status.st_ino, status.st_size, status.st_mtime_ns)

    def to_text(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_text(cls, text: str) -> CheckpointIdentity:
        return cls(**json.loads(text))


def _attribute(file: h5py.File, name: str) -> str:
    value = file.attrs[name]
    return value.decode() if isinstance(value, bytes) else str(value)


def _move_away(path: Path, what: str) -> str:
    """Why the state file ``path`` cannot be used (``what``), and what to do."""
    return (
        f"{path}: {what}; move it away (the optimizer of that round's checkpoint then starts "
        "again from its initial state)"
    )


def _states(layout: Layout) -> dict[int, Path]:
    """The state files of the history, by round."""
    return {
        number: state_path(layout, number)
        for number in history(layout)
        if state_path(layout, number).is_file()
    }


def paired_state(layout: Layout) -> tuple[int, Path] | None:
    """(round, file) of the state that belongs to the checkpoint in place, if one does.

    Raises ProblemError for a state file that cannot be read.
    """
    try:
        current = CheckpointIdentity.of(layout.checkpoint)
    except OSError:
        return None
    for number, path in sorted(_states(layout).items(), reverse=True):
        try:
            with h5py.File(path, "r") as file:
                identity = CheckpointIdentity.from_text(_attribute(file, "checkpoint"))
        except (OSError, KeyError, ValueError, TypeError) as error:
            what = f"not a readable optimizer state ({error})"
            raise ProblemError(_move_away(path, what)) from None
        if identity == current:
            return number, path
    return None


def check_fit(strategy: Strategy, plan: Sequence[Weight]) -> None:
    """Raise ConfigError if ``strategy`` cannot work on the weights of ``plan``.

    Complex weights have no order (median, trimmed mean) and no sign (Yogi),
    and ``D^2`` of a complex update is not a variance: only the mean with
    fedavg or fedavgm averages them, without differential privacy.
    """
    complex_weight = next((w for w in plan if w.encoding.is_complex), None)
    if complex_weight is None:
        return
    where = f"(the checkpoint has complex weights: {complex_weight.name!r})"
    if strategy.optimizer.adaptive:
        raise ConfigError("STRATEGY", strategy.optimizer.name, f"fedavg or fedavgm {where}")
    if strategy.combination.robust:
        raise ConfigError("ROBUST_AGGREGATION", strategy.combination.method, f"mean {where}")
    if strategy.privacy is not None:  # the noise is real; its analysis is for real vectors
        expected = f"0 {where}"
        raise ConfigError("DP_NOISE_MULTIPLIER", strategy.privacy.noise_multiplier, expected)


def check_strategy(
    layout: Layout, optimizer: ServerOptimizer, plan: Sequence[Weight]
) -> Path | None:
    """The state the next aggregation starts from (None: the initial one), checked.

    Raises ConfigError if the state that belongs to the checkpoint was made by
    another strategy (see the module's docstring), ProblemError if it does not
    hold the moments of every weight array.
    """
    paired = paired_state(layout)
    if paired is None:
        if _states(layout) and optimizer.moments:
            log.warning(
                "no optimizer state in %s belongs to the checkpoint in place (replaced by "
                "hand, or the folder was copied): %s starts from m = 0, v = TAU^2",
                layout.own / "history",
                optimizer.name,
            )
        elif optimizer.moments:
            log.info("%s: the optimizer state starts from m = 0, v = TAU^2", optimizer.name)
        return None
    number, path = paired
    with h5py.File(path, "r") as file:
        made_by = _attribute(file, "strategy")
        if made_by != optimizer.name:
            raise ConfigError(
                "STRATEGY",
                optimizer.name,
                f"{made_by!r}, the strategy whose state ({path}) belongs to the checkpoint of "
                f"round {number}; to change strategy, remove the files "
                f"{layout.own / 'history'}/round-*{STATE_SUFFIX}: {optimizer.name} then starts "
                "from its initial state",
            )
        before = json.loads(_attribute(file, "hyperparameters"))
        _check_moments(file, path, optimizer, plan)
    changed = {k: (before.get(k), v) for k, v in optimizer.hyperparameters.items()
               if before.get(k) != v}  # fmt: skip
    if changed:
        shown = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        log.warning("%s: changed since round %d (%s); its state carries over",
                    optimizer.name, number, shown)  # fmt: skip
    log.info("%s: the optimizer state of round %d (%s) goes on", optimizer.name, number, path)
    return path


def _check_moments(
    file: h5py.File, path: Path, optimizer: ServerOptimizer, plan: Sequence[Weight]
) -> None:
    for moment in optimizer.moments:
        for weight in plan:
            _moment_in(file, path, moment, weight, ProblemError)


def _moment_in(
    file: h5py.File,
    path: Path,
    moment: str,
    weight: Weight,
    error: type[ProblemError] | type[AggregationError],
) -> h5py.Dataset:
    """The dataset of ``moment`` of ``weight`` in the state ``file``; ``error`` if there is
    none of the weight's shape and the moment's dtype (at start-up, and in every round: a
    dataset of another shape would be read as rows of another length, wrong values)."""
    dataset = file.get(f"{moment}/{weight.name}")
    stored = state_encoding(weight.encoding).stored
    if (
        not isinstance(dataset, h5py.Dataset)
        or dataset.shape != weight.shape
        or dataset.dtype != stored
    ):
        found = (
            f"{dataset.shape} ({dataset.dtype})" if isinstance(dataset, h5py.Dataset) else "none"
        )
        raise error(
            _move_away(
                path,
                f"no {moment} of shape {weight.shape} ({stored}) for {weight.name!r} (found "
                f"{found}): not the state of this model",
            )
        )
    return dataset


@dataclass(frozen=True)
class StateUpdate:
    """The optimizer state a round's aggregation reads (``source``; None: the initial
    values) and writes (``dest``, published tied to the new checkpoint), for ``round``."""

    optimizer: ServerOptimizer
    source: Path | None
    dest: Path
    round: int

    @contextlib.contextmanager
    def rewrite(self, tmp_dir: Path) -> Iterator[Moments]:
        """The moments of this round, read and written slab by slab (after
        :meth:`Moments.prepare`); published by :meth:`Moments.publish` (else nothing of
        them is left)."""
        with contextlib.ExitStack() as stack:
            # Through descriptors of ours (see .hdf5_fd): plain moments are read through the
            # old file's and written with pwrite beside HDF5 (see .aggregation._rewrite).
            old = self._opened_source(stack) if self.source else None
            target = stack.enter_context(atomic_target(self.dest, tmp_dir, large=True))
            written = stack.enter_context(open_own(target, "w"))
            moments = Moments(self, old, written, target, (tmp_dir, stack))
            yield moments
            if not moments.published:
                raise AggregationError("the optimizer state was not published")  # a bug

    def _opened_source(self, stack: contextlib.ExitStack) -> OwnFile:
        """The state this round starts from, open, closed with ``stack``; AggregationError
        naming it if HDF5 cannot open it (else the OSError would be taken for a failure to
        write the checkpoint)."""
        assert self.source is not None
        try:
            return stack.enter_context(open_own(self.source, "r"))
        except OSError as error:
            raise_if_own_shortage(error)  # not the file's fault: it stays where it is
            what = f"not a readable optimizer state ({error})"
            raise AggregationError(_move_away(self.source, what)) from None


def _moment_of(name: str) -> str:
    """A moment's dataset ``m/<weight>``, for a person."""
    moment, weight = name.split("/", 1)
    return f"the optimizer's {moment} of {weight!r}"


#: A moment's dataset in a state file, and where its values lie when it is plain.
_Place = tuple[h5py.Dataset, Extent | None]


class Moments:
    """The moments of one aggregation: the old values in, the new values out.

    Plain datasets (what :meth:`prepare` creates, and so what earlier rounds
    wrote) are read with ``preadv`` and written with ``pwrite`` at their
    offsets, as the checkpoints' arrays are; old ones in any other layout are
    copied into a plain file first (:mod:`.plain_copy`), as inputs are. Reads
    and writes may come from several lanes (threads) at once, each on its own
    arrays: work buffers are kept per thread.
    """

    def __init__(
        self,
        update: StateUpdate,
        old: OwnFile | None,
        new: OwnFile,
        path: Path,
        copies: tuple[Path, contextlib.ExitStack],
    ) -> None:
        self._update = update
        self._old = old.file if old else None
        self._new = new.file
        self._new_fd = new.fd
        #: Where the new state is written until it is published.
        self._path = path
        self._read_from: dict[str, _Place] = {}
        self._written: dict[str, _Place] = {}
        #: The descriptor the old state is read through (plain moments with ``preadv``,
        #: not h5py: each h5py call takes its global lock, which the lanes would contend
        #: for on every slab).
        self._old_fd = old.fd if old else -1
        #: Where the old moments that are not plain are copied, and the stack that
        #: removes the copy (and closes it) when the pass ends.
        self._copies = copies
        #: Where the moments of ``_read_from`` are read from, when not the old file.
        self._fds: dict[str, int] = {}
        self._lanes = threading.local()
        self.published = False

    @property
    def names(self) -> tuple[str, ...]:
        return self._update.optimizer.moments

    def prepare(self, plan: Sequence[Weight], cancel: PassControl | None = None) -> None:
        """Create every moment of ``plan``'s arrays in the new state, allocated and its
        space reserved, and find the old ones: before the pass, whose lanes then only
        read and write values. AggregationError if an old one is not where it says;
        ShuttingDown when ``cancel`` is set while an old one is copied."""
        if cancel is not None:
            cancel.scratch(self._path)
        old_size = os.fstat(self._old_fd).st_size if self._old else 0
        for moment in self.names:
            for weight in plan:
                name = f"{moment}/{weight.name}"
                stored = state_encoding(weight.encoding).stored
                dcpl = allocated_early(h5py.h5p.create(h5py.h5p.DATASET_CREATE))
                created = self._new.create_dataset(name, weight.shape, stored, dcpl=dcpl)
                self._written[name] = (created, extent_of(created, stored, None, self._update.dest))
                if self._old is not None:
                    source = self._update.source
                    assert source is not None
                    found = _moment_in(self._old, source, moment, weight, AggregationError)
                    try:
                        self._read_from[name] = (found, extent_of(found, stored, old_size, source))
                    except ContributionError as error:
                        raise AggregationError(
                            f"{source}: the optimizer's {moment} of {weight.name!r} cannot be "
                            f"read ({error})"
                        ) from None
        reserve(self._new_fd, self._new.id.get_filesize())
        self._copy_unplain(cancel)

    def _copy_unplain(self, cancel: PassControl | None) -> None:
        """Copy the old moments that are not plain (a state file made by hand: ours are
        plain), each chunk read once, into a plain file read like the others: read in
        C-order slabs through h5py, whose chunk cache (8 MiB) may hold less than a band
        of chunks, each chunk was read once per slab in it (column chunks of a (1500,
        1500) moment: 19 times). Without room for the copy, through h5py, slowly."""
        source = self._update.source
        unplain = {name: dataset for name, (dataset, extent) in self._read_from.items()
                   if extent is None}  # fmt: skip
        if not unplain:
            return
        assert source is not None
        tmp_dir, stack = self._copies
        arrays = [(name, dataset, dataset.dtype) for name, dataset in unplain.items()]
        try:
            copy = stack.enter_context(copy_plain(arrays, tmp_dir, source, cancel, _moment_of))
            fd, _ = copy.file.open_fd("plain copy of the optimizer state")
        except ContributionError as error:
            what = str(error).removeprefix(f"{source}: ")
            raise AggregationError(_move_away(source, what)) from None
        except OSError as error:
            raise_if_own_shortage(error)  # out of descriptors, not of room: the pass fails as ours
            log.warning("%s: no plain copy of the optimizer state could be written in %s "
                        "(%s); it is read through HDF5, slowly", source, tmp_dir,
                        error)  # fmt: skip
            return
        stack.callback(os.close, fd)
        for name, dataset in unplain.items():
            self._read_from[name] = (dataset, copy.extents[name])
            self._fds[name] = fd

    def read(self, weight: Weight, moment: str, selection: Selection) -> np.ndarray:
        """``moment`` of ``weight`` over ``selection``, in the accumulator's dtype (a work
        array of its own: the step updates it in place, :meth:`write` stores it)."""
        shape = slab_shape(weight.shape, selection)
        work = self.buffer((moment, weight.encoding.accumulator), shape)
        if self._old is None:
            work.fill(self._update.optimizer.initial(moment))
            return work
        stored = self.buffer(state_encoding(weight.encoding).stored, shape)
        name = f"{moment}/{weight.name}"
        dataset, extent = self._read_from[name]
        source = self._update.source
        assert source is not None
        try:
            if extent is None:
                dataset.read_direct(stored, source_sel=selection or None)
            else:
                read_slab(self._fds.get(name, self._old_fd), extent, selection, stored, source)
        except ContributionError as error:
            raise AggregationError(str(error)) from None
        except (OSError, RuntimeError) as error:  # HDF5's, of a chunk it cannot read
            what = f"{_moment_of(name)} cannot be read ({error})"
            raise AggregationError(_move_away(source, what)) from None
        work[...] = stored
        return work

    def write(self, weight: Weight, moment: str, selection: Selection, values: np.ndarray) -> None:
        """Store ``values`` as ``moment`` of ``weight`` over ``selection``; AggregationError if
        they do not fit its dtype (an update so large that ``D^2`` overflows)."""
        encoding = state_encoding(weight.encoding)
        stored = self.buffer(encoding.stored, values.shape)
        with np.errstate(over="ignore", invalid="ignore"):
            np.copyto(stored, values, casting="same_kind")
        if not np.isfinite(stored.sum()) and not np.all(np.isfinite(stored)):
            raise AggregationError(
                f"dataset {weight.name!r}: the optimizer's {moment} overflows "
                f"{encoding.stored} (an update of that size cannot be averaged)"
            )
        dataset, extent = self._written[f"{moment}/{weight.name}"]
        if extent is None:
            dataset.write_direct(stored, dest_sel=selection or None)
        else:
            write_slab(self._new_fd, extent, stored, selection)

    def buffer(self, key: Hashable, shape: tuple[int, ...]) -> np.ndarray:
        """A work buffer of ``shape`` for ``key`` (a dtype, or (name, dtype)): a view of
        the largest one this thread made for that key so far, so a pass allocates a few
        slabs per lane in all (the step's scratch space comes from here too)."""
        buffers: dict[Hashable, np.ndarray] = self._lanes.__dict__.setdefault("buffers", {})
        dtype = key[1] if isinstance(key, tuple) else key
        size = math.prod(shape)
        buffer = buffers.get(key)
        if buffer is None or buffer.size < size:
            buffer = buffers[key] = np.empty(size, dtype)
        return leading(buffer, shape)

    def publish(self, checkpoint: Path) -> None:
        """Name the new ``checkpoint`` (complete, not yet in place) in the state, then let
        the state be renamed into the history (before the checkpoint is)."""
        optimizer = self._update.optimizer
        attrs = self._new.attrs
        attrs["strategy"] = optimizer.name
        attrs["round"] = self._update.round
        attrs["hyperparameters"] = json.dumps(optimizer.hyperparameters)
        attrs["checkpoint"] = CheckpointIdentity.of(checkpoint).to_text()
        self.published = True
