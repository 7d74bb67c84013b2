"""Inputs stored in chunks (any layout a selector may choose) are read once per pass.

HDF5 reads a filtered chunk whole for each read that wants part of it
(untrusted files get no chunk cache), and an unfiltered chunk in one call per
run of values a read wants. The pass reads C-order slabs, so up to bdb695e a
chunk spanning n slabs was read n times per input, and a column chunk a value
per call. Now each input that is not plain is copied, in whole chunks,
into a plain file of the coordinator's own (storage/plain_copy.py), which the
pass reads like any plain input, and removes.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from helpers import REPO
from helpers.resources import bytes_read, read_calls
from helpers.selector_fs import mounted, needs_fuse
from storage.test_disk_full import _mounted, mount  # noqa: F401 (a fixture)

from fl_coordinator.core.privacy import DifferentialPrivacy
from fl_coordinator.core.strategy import STRATEGIES, Combination, ServerOptimizer, Strategy
from fl_coordinator.errors import CheckpointError, ContributionsRefused, ShuttingDown
from fl_coordinator.storage import plain_copy
from fl_coordinator.storage.aggregation import (
    THROUGH_HDF5_MAX,
    Contribution,
    ServerUpdate,
    aggregate,
)
from fl_coordinator.storage.contribution import CheckpointSpec, SelectorFiles, examine
from fl_coordinator.storage.pass_control import PassControl
from fl_coordinator.storage.plain_copy import HEADROOM, HEADROOM_MAX_BYTES, kept_free
from fl_coordinator.storage.strategy_state import StateUpdate
from fl_coordinator.storage.untrusted import UntrustedFile
from fl_coordinator.storage.weights import read_plan

NAME = "layers/w/vars/0"
BIAS = "layers/w/vars/1"

#: How a selector may store an array: h5py's create_dataset options (shape -> options).
LAYOUTS: dict[str, Callable[[tuple[int, ...]], dict]] = {
    "plain": lambda shape: {},
    # whole rows, a chunk spanning many slabs, filtered: read whole for each
    "rows-filtered": lambda shape: {"chunks": (min(shape[0], shape[0] // 2 + 24), *shape[1:]),
                                    "shuffle": True, "fletcher32": True},
    # one column each: every whole-row slab touches every chunk
    "columns": lambda shape: {"chunks": (shape[0], *(1,) * (len(shape) - 1))},
    "columns-filtered": lambda shape: {"chunks": (shape[0], *(1,) * (len(shape) - 1)),
                                       "shuffle": True, "fletcher32": True},
    "squares-filtered": lambda shape: {"chunks": tuple(min(n, 100) for n in shape),
                                       "fletcher32": True},
    "one-chunk-filtered": lambda shape: {"chunks": shape, "fletcher32": True},
    "big-endian": lambda shape: {"dtype": ">f4"},  # contiguous, not readable as plain
}  # fmt: skip


def write_input(path: Path, arrays: dict[str, np.ndarray], layout: str) -> Path:
    """``arrays`` in a file of ``layout`` (every array but 1-D biases, which stay plain)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        for name, values in arrays.items():
            options = LAYOUTS[layout](values.shape) if values.ndim > 1 else {}
            file.create_dataset(name, data=values, **options)
    return path


def inputs(
    folder: Path, arrays: list[dict[str, np.ndarray]], layouts: list[str]
) -> list[Contribution]:
    """One selector's aggregate per ``arrays``, in ``folder/s<i>/agg``, stored as ``layouts``."""
    parts = []
    for i, (values, layout) in enumerate(zip(arrays, layouts, strict=True)):
        write_input(folder / f"s{i}/agg", values, layout)
        parts.append(Contribution(f"s{i}", UntrustedFile(folder, f"s{i}/agg"), i + 2))
    return parts


def model(shape: tuple[int, ...], count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """The global weights and ``count`` updates, float32."""
    rng = np.random.default_rng(seed)
    return [
        {NAME: rng.normal(size=shape).astype(np.float32),
         BIAS: rng.normal(size=shape[-1:]).astype(np.float32)}
        for _ in range(count + 1)
    ]  # fmt: skip


def bits(path: Path) -> dict[str, bytes]:
    """Every float array of a checkpoint or state file, as bytes."""
    found: dict[str, bytes] = {}
    with h5py.File(path, "r") as file:
        file.visititems(
            lambda name, obj: (
                found.__setitem__(name, obj[()].tobytes())
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return found


def leftovers(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.exists() else []


def averaged(
    folder: Path, arrays: list[dict[str, np.ndarray]], layouts: list[str], strategy: Strategy
) -> dict[str, bytes]:
    """The new checkpoint (and optimizer state) of one pass over inputs of ``layouts``."""
    write_input(folder / "fl_checkpoint", arrays[0], "plain")
    parts = inputs(folder, arrays[1:], layouts)
    state = None
    if strategy.optimizer.moments:
        state = StateUpdate(strategy.optimizer, None, folder / "state.h5", 1)
    noise = np.random.default_rng(5)
    aggregate(folder / "fl_checkpoint", parts, folder / "tmp", None,
              ServerUpdate(strategy, state, noise))  # fmt: skip
    assert leftovers(folder / "tmp") == []
    found = bits(folder / "fl_checkpoint")
    if state is not None:
        found.update({f"state/{k}": v for k, v in bits(folder / "state.h5").items()})
    return found


@pytest.mark.parametrize("method", ["mean", "median"])
@pytest.mark.parametrize(
    ("layout", "shape"),
    [("rows-filtered", (1000, 1000)), ("columns", (1000, 1000)),
     ("columns-filtered", (1000, 1000)), ("rows-filtered", (1, 2**21))],
    ids=["rows-filtered", "columns", "columns-filtered", "one-wide-row"],
)  # fmt: skip
def test_each_chunk_of_an_input_is_read_once_per_pass(
    tmp_path: Path, layout: str, shape: tuple[int, ...], method: str
) -> None:
    """Bytes and read calls of a pass over 3 chunked inputs, against their files' sizes.

    On bdb695e (inputs read through h5py in C-order slabs), K = 3 of (1000, 1000):
    rows-filtered read 6x the files (median 40x), columns-filtered 10x (median 93x);
    unfiltered columns read 1.1x but in 2.3 million calls (12 s; K = 10 of
    (2000, 2000): 130 s). Now about 2x (each input read by its copy, the copy by the
    pass) in a few calls per chunk; and the same bits as plain inputs."""
    arrays = model(shape, 3)
    strategy = Strategy(combination=Combination(method))
    expected = averaged(tmp_path / "plain", arrays, ["plain"] * 3, strategy)
    folder = tmp_path / "chunked"
    write_input(folder / "fl_checkpoint", arrays[0], "plain")
    parts = inputs(folder, arrays[1:], [layout] * 3)
    files = sum(p.stat().st_size for p in folder.glob("**/*") if p.is_file())
    with h5py.File(parts[0].checkpoint.path, "r") as file:
        chunks = 3 * file[NAME].id.get_num_chunks()
    calls, before = read_calls(), bytes_read()
    aggregate(folder / "fl_checkpoint", parts, folder / "tmp", None, ServerUpdate(strategy))
    read, calls = bytes_read() - before, read_calls() - calls
    assert read < 2.5 * files, (read, files)
    assert calls < 4 * chunks + 2000, (calls, chunks)
    assert bits(folder / "fl_checkpoint") == expected
    assert leftovers(folder / "tmp") == []


@pytest.mark.parametrize("layout", ["columns", "columns-filtered", "rows-filtered"])
def test_the_check_reads_each_chunk_in_one_call(tmp_path: Path, layout: str) -> None:
    """The check reads whole chunks; without a chunk cache HDF5 read an unfiltered column
    chunk into them one value per call (a (1000, 1000) array: a million calls, 12.6 s for
    (2000, 2000)); with a cache of one chunk, one call per chunk (0.05 s)."""
    arrays = model((1000, 1000), 1)
    checkpoint = write_input(tmp_path / "fl_checkpoint", arrays[0], "plain")
    (part,) = inputs(tmp_path, arrays[1:], [layout])
    (tmp_path / "s0/weight").write_text("3")
    with h5py.File(checkpoint, "r") as file:
        spec = CheckpointSpec(tuple(read_plan(file, checkpoint)), checkpoint.stat().st_size)
    with h5py.File(part.checkpoint.path, "r") as file:
        chunks = file[NAME].id.get_num_chunks()
    calls = read_calls()
    checked = examine("s0", SelectorFiles(tmp_path, "agg", "weight"), spec)
    calls = read_calls() - calls
    assert (checked.weight, checked.plain) == (3, None)  # the aggregation copies it
    assert calls < 2 * chunks + 100, (calls, chunks)


MIXED = ["rows-filtered", "columns", "big-endian", "squares-filtered", "plain"]


@pytest.mark.parametrize("method", ["mean", "median", "trimmed_mean", "privacy"])
@pytest.mark.parametrize("optimizer", STRATEGIES)
def test_every_strategy_gives_the_same_bits_as_with_plain_inputs(
    tmp_path: Path, optimizer: str, method: str
) -> None:
    """Five inputs, each stored another way (chunked, filtered, another byte order, plain),
    give the very bits (checkpoint and optimizer state) that five plain inputs do."""
    arrays = model((300, 200), len(MIXED), seed=len(method))
    if method == "privacy":
        noise = DifferentialPrivacy(noise_multiplier=0.5, clip_norm=1.0, denominator=5,
                                    population=10)  # fmt: skip
        strategy = Strategy(ServerOptimizer.of(optimizer), privacy=noise)
    else:
        strategy = Strategy(ServerOptimizer.of(optimizer), Combination(method))
    plain = averaged(tmp_path / "plain", arrays, ["plain"] * len(MIXED), strategy)
    assert averaged(tmp_path / "mixed", arrays, MIXED, strategy) == plain


class CancelAfter(PassControl):
    """Stopped by the ``calls``-th look at it: a coordinator stopping midway through a copy."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    def is_set(self) -> bool:
        self.calls -= 1
        if self.calls == 0:
            self.stop()
        return super().is_set()


def test_copies_are_removed_when_a_pass_is_cancelled_or_fails(tmp_path: Path) -> None:
    arrays = model((1000, 1000), 3)
    checkpoint = write_input(tmp_path / "fl_checkpoint", arrays[0], "plain")
    before = checkpoint.read_bytes()
    parts = inputs(tmp_path, arrays[1:], ["columns-filtered"] * 3)
    copied: list[Path] = []

    class Watching(CancelAfter):
        def is_set(self) -> bool:  # what the tmp folder holds while the second input is copied
            copied.extend(p for p in leftovers(tmp_path / "tmp") if p.name.startswith(".input"))
            return super().is_set()

    with pytest.raises(ShuttingDown):
        aggregate(checkpoint, parts, tmp_path / "tmp", Watching(3))  # 2 blocks per input
    assert len(set(copied)) == 2  # the first input's copy, and the second's begun
    assert leftovers(tmp_path / "tmp") == []
    assert checkpoint.read_bytes() == before
    # A pass that fails after its copies are made (NaN in an input) leaves none either.
    with h5py.File(parts[2].checkpoint.path, "r+") as file:
        file[NAME][999, 999] = np.nan
    with pytest.raises(ContributionsRefused, match="NaN") as refused:
        aggregate(checkpoint, parts, tmp_path / "tmp")
    assert list(refused.value.reasons) == ["s2"]
    assert str(parts[2].checkpoint.path) in refused.value.reasons["s2"]
    assert leftovers(tmp_path / "tmp") == []
    assert checkpoint.read_bytes() == before


def test_an_input_whose_chunk_cannot_be_read_is_refused_alone(tmp_path: Path) -> None:
    """A chunk whose fletcher32 checksum fails (its data damaged after its check) refuses its
    input while it is copied, with a reason that names the file and the dataset."""
    arrays = model((1000, 1000), 3)
    checkpoint = write_input(tmp_path / "fl_checkpoint", arrays[0], "plain")
    before = checkpoint.read_bytes()
    parts = inputs(tmp_path, arrays[1:], ["plain", "rows-filtered", "rows-filtered"])
    damaged = parts[1].checkpoint.path
    with h5py.File(damaged, "r") as file:
        offset = file[NAME].id.get_chunk_info(1).byte_offset
    with open(damaged, "r+b") as raw:
        raw.seek(offset + 1000)
        byte = raw.read(1)
        raw.seek(offset + 1000)
        raw.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ContributionsRefused) as refused:
        aggregate(checkpoint, parts, tmp_path / "tmp")
    assert list(refused.value.reasons) == ["s1"]
    reason = refused.value.reasons["s1"]
    assert reason.startswith(f"{damaged}: dataset '{NAME}' cannot be read (OSError: ")
    assert leftovers(tmp_path / "tmp") == []
    assert checkpoint.read_bytes() == before


@needs_fuse
@pytest.mark.fuse
@pytest.mark.parametrize("code", [errno.EIO, errno.EMFILE])
@pytest.mark.parametrize("layout", ["plain", "rows-filtered"])
def test_a_selector_file_system_failing_close_fails_no_pass(
    tmp_path: Path, layout: str, code: int
) -> None:
    """An input's folder is its selector's own file system (FUSE), whose server answers
    EIO (or EMFILE) to every close (flush) of the input from the N-th on, for N = 1, 2, 3:
    each pass succeeds, its checkpoint bit for bit the pass's over the same files on a
    plain folder. A close of a file read only loses nothing.

    Before: the OSError of the close came out of the pass: a CheckpointError for
    everyone ("cannot write the new global checkpoint", or for EMFILE "the coordinator
    ran out of its own resources"), and for N = 2 on a plain input raised after the new
    checkpoint was published, saying it was kept as it was."""
    arrays = model((100, 100), 2)
    reference = write_input(tmp_path / "reference/fl_checkpoint", arrays[0], "plain")
    aggregate(reference, inputs(tmp_path / "reference", arrays[1:], ["plain", layout]),
              tmp_path / "reference/tmp")  # fmt: skip
    for after in (1, 2, 3):
        folder = tmp_path / str(after)
        checkpoint = write_input(folder / "fl_checkpoint", arrays[0], "plain")
        parts = inputs(folder, arrays[1:], ["plain", layout])
        (folder / "s1").rename(folder / "served")
        with mounted(folder / "served", folder / "s1", "agg", "flush", code, after):
            aggregate(checkpoint, parts, folder / "tmp")
        assert bits(checkpoint) == bits(reference), after
        assert leftovers(folder / "tmp") == []


def test_without_room_for_copies_inputs_are_read_through_hdf5(
    tmp_path: Path,
    mount: Path,  # noqa: F811 (the fixture)
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The checkpoint on a 4 MiB tmpfs: the new one is reserved first, the copies take what
    is left, and those that do not fit are read through h5py (our disk is full: not the
    selectors' fault). Same bits; nothing left behind."""
    arrays = model((400, 500), 6)  # 800 kB per array
    strategy = Strategy()
    expected = averaged(tmp_path / "plain", arrays, ["plain"] * 6, strategy)
    checkpoint = write_input(mount / "fl_checkpoint", arrays[0], "plain")
    parts = inputs(tmp_path / "inputs", arrays[1:], ["columns-filtered"] * 6)
    with caplog.at_level(logging.WARNING):
        aggregate(checkpoint, parts, mount / "tmp", None, ServerUpdate(strategy))
    fallen_back = [r.getMessage() for r in caplog.records if "no plain copy" in r.getMessage()]
    assert 0 < len(fallen_back) < 6, fallen_back  # some copied, some not
    assert "No space left on device" in fallen_back[0]
    assert bits(checkpoint) == expected
    assert leftovers(mount / "tmp") == []


class Watching(PassControl):
    """Never set; each look at it (every block of a copy, every slab of the pass) records
    the free bytes of ``folder``'s file system and this process's open descriptors."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.free: list[int] = []
        self.descriptors: list[int] = []

    def is_set(self) -> bool:
        self.free.append(shutil.disk_usage(self.folder).free)
        self.descriptors.append(len(os.listdir("/proc/self/fd")))
        return super().is_set()


def test_copies_leave_a_share_of_the_disk_free(tmp_path: Path) -> None:
    """30 inputs of 800 kB in chunks, the checkpoint on a 20 MiB tmpfs: the pass holds every
    copy at once, and on bc4dbaa they took all that was free (80 KiB left during the
    pass, for the journal, the lease, the round log). Now at least HEADROOM of the file
    system stays free; the inputs left without a copy are read through HDF5, same bits."""
    arrays = model((400, 500), 30)
    expected = averaged(tmp_path / "plain", arrays, ["plain"] * 30, Strategy())
    with _mounted(tmp_path / "mnt", "-t", "tmpfs", "-o", "size=20m", "tmpfs") as point:
        checkpoint = write_input(point / "fl_checkpoint", arrays[0], "plain")
        parts = inputs(tmp_path / "inputs", arrays[1:], ["columns-filtered"] * 30)
        watching = Watching(point)
        aggregate(checkpoint, parts, point / "tmp", watching)
        assert bits(checkpoint) == expected
        assert leftovers(point / "tmp") == []
        assert min(watching.free) >= HEADROOM * 20 * 2**20, min(watching.free)


def test_inputs_read_through_hdf5_for_want_of_room_are_bounded(
    tmp_path: Path,
    mount: Path,  # noqa: F811 (the fixture)
) -> None:
    """No room for any copy and more inputs in chunks than THROUGH_HDF5_MAX: each read
    through HDF5 stays open for the pass, so on bc4dbaa K of them held K files open (K = 100
    under a limit of 100 open files: ten selectors refused for "Too many open files").
    Now the pass fails as our disk's fault, naming the tmp folder; no selector refused,
    the checkpoint unchanged, nothing left behind, descriptors bounded."""
    count = THROUGH_HDF5_MAX + 8
    arrays = model((100, 200), count)  # 80 kB per array
    checkpoint = write_input(mount / "fl_checkpoint", arrays[0], "plain")
    before = checkpoint.read_bytes()
    parts = inputs(tmp_path / "inputs", arrays[1:], ["columns-filtered"] * count)
    # Room for the new checkpoint (about 82 kB) and the share kept free, not for a copy.
    free = shutil.disk_usage(mount).free
    (mount / "ballast").write_bytes(bytes(free - int(HEADROOM * 4 * 2**20) - 120_000))
    watching = Watching(mount)
    at_start = len(os.listdir("/proc/self/fd"))
    with pytest.raises(CheckpointError) as failed:
        aggregate(checkpoint, parts, mount / "tmp", watching)
    message = str(failed.value)
    assert message.startswith(f"no room in {mount / 'tmp'} for a plain copy of "), message
    assert f"nor of {THROUGH_HDF5_MAX} other aggregates" in message
    assert checkpoint.read_bytes() == before
    assert leftovers(mount / "tmp") == []
    assert max(watching.descriptors, default=at_start) - at_start <= THROUGH_HDF5_MAX + 8


MEASURE = """
import resource, sys
from pathlib import Path
from fl_coordinator.core.strategy import Combination, Strategy
from fl_coordinator.storage.aggregation import Contribution, ServerUpdate, aggregate
from fl_coordinator.storage.contribution import CheckpointSpec, SelectorFiles, examine
from fl_coordinator.storage.plain_copy import HEADROOM
from fl_coordinator.storage.untrusted import UntrustedFile
from fl_coordinator.storage.weights import read_plan
from helpers.resources import peak_rss, reset_peak

folder, count, method = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[4]), hard))
parts = [Contribution(f"s{i}", UntrustedFile(folder, f"s{i}/agg"), i + 2) for i in range(count)]
baseline = reset_peak()
aggregate(folder / "fl_checkpoint", parts, folder / "tmp", None,
          ServerUpdate(Strategy(combination=Combination(method))))
print(peak_rss() - baseline)
"""


@pytest.mark.parametrize("method", ["mean", "median"])
def test_memory_and_open_files_are_flat_in_the_number_of_chunked_inputs(
    tmp_path: Path, method: str
) -> None:
    """Peak memory of a pass over K = 3 and K = 100 chunked inputs, in a process allowed
    100 open files: on bdb695e every input read through h5py stayed open (K = 100 failed
    with EMFILE, and each cost its HDF5 file's memory)."""
    peaks = []
    for count in (3, 100):
        folder = tmp_path / str(count)
        arrays = model((512, 512), count)
        write_input(folder / "fl_checkpoint", arrays[0], "plain")
        inputs(folder, arrays[1:], ["columns-filtered"] * count)
        result = subprocess.run(
            [sys.executable, "-c", MEASURE, str(folder), str(count), method, "100"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO / "tests")},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        peaks.append(int(result.stdout))
    assert peaks[1] - peaks[0] < 8 * 2**20, peaks


def test_a_copy_holds_about_one_chunk_whatever_the_number_of_arrays(tmp_path: Path) -> None:
    """Every dataset of a file being copied stays open, and each kept its last chunks in
    its cache (one chunk, for one read call per chunk): 3 inputs of 40 arrays in 2 MB
    chunks peaked 89 MiB above the start; refreshed after its copy, 14."""
    rng = np.random.default_rng(2)
    names = [f"layers/d{i}/vars/0" for i in range(40)]
    arrays = [{name: rng.normal(size=(500, 1000)).astype(np.float32) for name in names}
              for _ in range(4)]  # fmt: skip
    write_input(tmp_path / "fl_checkpoint", arrays[0], "plain")
    inputs(tmp_path, arrays[1:], ["one-chunk-filtered"] * 3)
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path), "3", "mean", "100"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO / "tests")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    largest = 500 * 1000 * 4
    assert int(result.stdout) < 2 * largest + 24 * 2**20


def store_in_chunks(state: Path) -> None:
    """Rewrite a state file of ours (plain) with its moments in filtered column chunks."""
    with h5py.File(state, "r") as old, h5py.File(state.with_suffix(".new"), "w") as new:
        new.attrs.update(dict(old.attrs))
        for name in [f"{m}/{k}" for m in ("m", "v") for k in (NAME, BIAS)]:
            values = old[name][()]
            options = LAYOUTS["columns-filtered"](values.shape) if values.ndim > 1 else {}
            new.create_dataset(name, data=values, **options)
    os.replace(state.with_suffix(".new"), state)


def test_an_optimizer_state_stored_in_chunks_is_read_once_and_gives_the_same_bits(
    tmp_path: Path,
) -> None:
    """A state file made by hand in filtered column chunks (ours are plain): its moments
    are copied once, like an input's; the second round's bits are those of a plain state.
    Read through h5py in C-order slabs (its 8 MiB chunk cache holds less than a band of
    these chunks), the state alone read 19 times its size (342 MB for 18)."""
    arrays = model((1500, 1500), 3)  # a band of column chunks: 9 MB, more than h5py's cache
    optimizer = ServerOptimizer.of("fedadam")
    found, extra = [], []
    for chunked in (False, True):
        folder = tmp_path / str(chunked)
        checkpoint = write_input(folder / "fl_checkpoint", arrays[0], "plain")
        parts = inputs(folder, arrays[1:], ["plain"] * 3)
        first = StateUpdate(optimizer, None, folder / "state-1.h5", 1)
        aggregate(checkpoint, parts, folder / "tmp", None,
                  ServerUpdate(Strategy(optimizer), first))  # fmt: skip
        state = folder / "state-1.h5"
        if chunked:
            store_in_chunks(state)
        second = StateUpdate(optimizer, state, folder / "state-2.h5", 2)
        before = bytes_read()
        aggregate(checkpoint, parts, folder / "tmp", None,
                  ServerUpdate(Strategy(optimizer), second))  # fmt: skip
        extra.append(bytes_read() - before - (state.stat().st_size if chunked else 0))
        found.append({**bits(checkpoint), **bits(folder / "state-2.h5")})
        assert leftovers(folder / "tmp") == []
    assert found[0] == found[1]
    assert extra[1] - extra[0] < 1.5 * (tmp_path / "True/state-1.h5").stat().st_size, extra


def test_the_copy_of_an_optimizer_state_stored_in_chunks_stops_when_cancelled(
    tmp_path: Path,
) -> None:
    """Shutting down while an old state in chunks is copied: ShuttingDown before it is
    read through (before: the copy was given no cancel event, so the whole state was read
    first), nothing left in tmp."""
    arrays = model((1500, 1500), 3)
    optimizer = ServerOptimizer.of("fedadam")
    checkpoint = write_input(tmp_path / "fl_checkpoint", arrays[0], "plain")
    parts = inputs(tmp_path, arrays[1:], ["plain"] * 3)
    first = StateUpdate(optimizer, None, tmp_path / "state-1.h5", 1)
    aggregate(checkpoint, parts, tmp_path / "tmp", None, ServerUpdate(Strategy(optimizer), first))
    state = tmp_path / "state-1.h5"
    store_in_chunks(state)
    cancel = PassControl()
    cancel.stop()
    second = StateUpdate(optimizer, state, tmp_path / "state-2.h5", 2)
    before = bytes_read()
    with pytest.raises(ShuttingDown):
        aggregate(checkpoint, parts, tmp_path / "tmp", cancel,
                  ServerUpdate(Strategy(optimizer), second))  # fmt: skip
    assert bytes_read() - before < state.stat().st_size / 2
    assert leftovers(tmp_path / "tmp") == []


def out_of_descriptors_at_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each plain copy's ``mkstemp`` runs with no descriptor left to this process (its
    RLIMIT_NOFILE lowered to the lowest free descriptor, and raised again after)."""
    real = tempfile.mkstemp

    def exhausted(*args: object, **kwargs: object) -> tuple[int, str]:
        lowest = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
        try:
            return real(*args, **kwargs)  # type: ignore[call-overload]
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    monkeypatch.setattr(plain_copy, "tempfile", SimpleNamespace(mkstemp=exhausted))


@pytest.mark.parametrize("chunked", ["input", "optimizer state"])
def test_out_of_descriptors_for_a_copy_fails_the_pass_as_ours_not_as_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, chunked: str
) -> None:
    """A plain copy whose file cannot be made for want of descriptors (EMFILE): the pass
    fails as the coordinator's (its CheckpointError, what to raise), the checkpoint and
    state kept, nothing left in tmp. Before, EMFILE was taken for no room on the disk: the
    input (or state) was read through HDF5 instead, which holds one descriptor more."""
    arrays = model((300, 300), 2)
    optimizer = ServerOptimizer.of("fedadam")
    checkpoint = write_input(tmp_path / "fl_checkpoint", arrays[0], "plain")
    layouts = ["columns-filtered", "plain"] if chunked == "input" else ["plain", "plain"]
    parts = inputs(tmp_path, arrays[1:], layouts)
    state = tmp_path / "state-1.h5"
    first = StateUpdate(optimizer, None, state, 1)
    aggregate(checkpoint, parts, tmp_path / "tmp", None, ServerUpdate(Strategy(optimizer), first))
    if chunked == "optimizer state":
        store_in_chunks(state)
    before = checkpoint.read_bytes(), state.read_bytes()
    out_of_descriptors_at_copy(monkeypatch)
    second = StateUpdate(optimizer, state, tmp_path / "state-2.h5", 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError) as failed:
        aggregate(
            checkpoint, parts, tmp_path / "tmp", None, ServerUpdate(Strategy(optimizer), second)
        )
    assert str(failed.value) == (
        "the coordinator ran out of its own resources while averaging ([Errno 24] Too many "
        "open files): raise its RLIMIT_NOFILE or memory; the global checkpoint is kept as it was"
    )
    assert (checkpoint.read_bytes(), state.read_bytes()) == before
    assert not (tmp_path / "state-2.h5").exists()
    assert leftovers(tmp_path / "tmp") == []
    assert [r.getMessage() for r in caplog.records if "no plain copy" in r.getMessage()] == []


def test_copies_keep_a_share_of_a_small_file_system_free_and_at_most_a_gigabyte() -> None:
    """On a 20 MiB tmpfs copies leave 10% free (the tests above); on a shared 250 GB disk
    they left 25 GB, and refused copies with tens of gigabytes free."""
    assert kept_free(20 * 2**20) == int(HEADROOM * 20 * 2**20) == 2_097_152
    assert kept_free(250 * 10**9) == HEADROOM_MAX_BYTES == 2**30
