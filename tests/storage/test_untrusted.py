"""A selector's folder as untrusted input: each file type, link and HDF5 feature, one by one.

These call the check (``contribution.examine``) and the aggregation directly;
``tests/test_untrusted_selectors.py`` throws the same at a running coordinator.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import trio
from helpers.resources import bytes_read, out_of_descriptors

from fl_coordinator.errors import ContributionError, ContributionsRefused
from fl_coordinator.storage import aggregation
from fl_coordinator.storage.aggregation import Contribution, aggregate
from fl_coordinator.storage.checkpoint import read_checkpoint_plan
from fl_coordinator.storage.contribution import (
    CheckpointSpec,
    SelectorFiles,
    examine,
    update_norm,
)
from fl_coordinator.storage.untrusted import (
    CHUNK_MAX_BYTES,
    NAME_MAX_CHARS,
    OURS,
    REASON_MAX_CHARS,
    UntrustedFile,
    clip,
    selector_error_is_own_shortage,
)

GLOBAL = {
    "layers/dense/vars/0": np.arange(20, dtype=np.float32).reshape(5, 4),
    "layers/dense/vars/1": np.zeros(4, np.float32),
}
MARKER = 1234.5  # the value every file outside the selector's folder holds


def write(path: Path, arrays: dict[str, np.ndarray], **options) -> Path:
    with h5py.File(path, "w") as file:
        for name, array in arrays.items():
            file.create_dataset(name, data=array, **options)
    return path


def update(value: float = 0.5) -> dict[str, np.ndarray]:
    return {name: np.full(array.shape, value, array.dtype) for name, array in GLOBAL.items()}


class Problem:
    """A root with the global checkpoint, a selector folder ``sel`` and files outside the root."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        self.folder = self.root / "sel"
        self.folder.mkdir(parents=True)
        self.checkpoint = write(self.root / "fl_checkpoint", GLOBAL)
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        write(self.outside / "fl_agg_checkpoint", update(MARKER))
        (self.outside / "fl_agg_checkpoint_weight").write_text("7\n")
        self.files = SelectorFiles(self.root, "fl_agg_checkpoint", "fl_agg_checkpoint_weight")
        self.aggregate = self.folder / "fl_agg_checkpoint"
        self.weight = self.folder / "fl_agg_checkpoint_weight"
        write(self.aggregate, update())
        self.weight.write_text("3\n")

    @property
    def spec(self) -> CheckpointSpec:
        plan = read_checkpoint_plan(self.checkpoint)
        return CheckpointSpec(plan, self.checkpoint.stat().st_size)

    async def examine(self) -> Contribution:
        """The check, in a thread with a deadline: a check that blocks fails the test."""
        with trio.fail_after(20):
            return await trio.to_thread.run_sync(
                examine, "sel", self.files, self.spec, abandon_on_cancel=True
            )

    async def rejected(self, expected: str) -> str:
        with pytest.raises(ContributionError) as raised:
            await self.examine()
        reason = clip(str(raised.value))
        assert expected in reason
        assert len(reason) <= REASON_MAX_CHARS
        return reason


@pytest.fixture
def problem(tmp_path: Path) -> Problem:
    return Problem(tmp_path)


def fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def unix_socket(path: Path) -> None:
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(path))


def device(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # what /dev/zero is


def link_outside(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(path.parent.parent.parent / "outside" / path.name)


def hard_link_outside(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.link(path.parent.parent.parent / "outside" / path.name, path)


def sparse(path: Path) -> None:
    with open(path, "wb") as file:
        file.truncate(2 * 2**30)  # 2 GiB that take no disk


def folder_in_place(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()


FILE_KINDS = {
    "fifo": (fifo, "is a FIFO (named pipe), not a regular file"),
    "socket": (unix_socket, "is a socket, not a regular file"),
    "device": (device, "is a character device, not a regular file"),
    "symlink outside": (link_outside, "is a symbolic link (links are not followed)"),
    "hard link outside": (hard_link_outside, "has 2 hard links"),
    "folder": (folder_in_place, "is a folder, not a regular file"),
    "missing": (lambda path: path.unlink(), "is missing"),
}


@pytest.mark.parametrize("which", ["aggregate", "weight"])
@pytest.mark.parametrize("kind", list(FILE_KINDS))
async def test_anything_but_a_regular_file_is_refused_unopened(
    problem: Problem, kind: str, which: str
) -> None:
    make, expected = FILE_KINDS[kind]
    path = problem.aggregate if which == "aggregate" else problem.weight
    make(path)
    reason = await problem.rejected(expected)
    assert reason.startswith(f"{path}: ")


async def test_a_huge_sparse_weight_file_is_not_read(problem: Problem) -> None:
    sparse(problem.weight)
    await problem.rejected(f"{problem.weight}: weight file is 2147483648 bytes; at most 64")


async def test_an_aggregate_far_larger_than_the_layout_is_not_opened(problem: Problem) -> None:
    sparse(problem.aggregate)
    limit = problem.spec.max_aggregate_bytes
    await problem.rejected(f"aggregate checkpoint is 2147483648 bytes; at most {limit}")


@pytest.mark.parametrize("kind", ["symlink", "fifo", "file"])
async def test_the_selector_folder_must_be_a_folder_of_its_own(problem: Problem, kind: str) -> None:
    os.replace(problem.folder, problem.root / "moved")
    if kind == "symlink":
        problem.folder.symlink_to(problem.outside)
        expected = "is a symbolic link (links are not followed), not a folder"
    elif kind == "fifo":
        os.mkfifo(problem.folder)
        expected = "is a FIFO (named pipe), not a folder"
    else:
        problem.folder.write_bytes(b"x")
        expected = "is a regular file, not a folder"
    reason = await problem.rejected(expected)
    assert "its folder 'sel' " in reason  # (below the root: the path is said once)


def external_link(file: h5py.File, outside: Path) -> None:
    del file["layers/dense/vars/0"]
    file["layers/dense/vars/0"] = h5py.ExternalLink(str(outside / "fl_agg_checkpoint"),
                                                    "layers/dense/vars/0")  # fmt: skip


def link_to_fifo(file: h5py.File, outside: Path) -> None:
    os.mkfifo(outside / "pipe")
    del file["layers/dense/vars/0"]
    file["layers/dense/vars/0"] = h5py.ExternalLink(str(outside / "pipe"), "/x")


def virtual(file: h5py.File, outside: Path) -> None:
    del file["layers/dense/vars/0"]
    layout = h5py.VirtualLayout(shape=(5, 4), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(outside / "fl_agg_checkpoint"), "layers/dense/vars/0",
                                   shape=(5, 4))  # fmt: skip
    file.create_virtual_dataset("layers/dense/vars/0", layout)


def external_storage(file: h5py.File, outside: Path) -> None:
    del file["layers/dense/vars/1"]
    file.create_dataset("layers/dense/vars/1", shape=(4,), dtype=np.float32,
                        external=[("/etc/passwd", 0, 16)])  # fmt: skip


def soft_link(file: h5py.File, outside: Path) -> None:
    file["spare"] = np.zeros(4, np.float32)
    del file["layers/dense/vars/1"]
    file["layers/dense/vars/1"] = h5py.SoftLink("/spare")


def soft_linked_group(file: h5py.File, outside: Path) -> None:
    file.move("layers", "elsewhere")
    file["layers"] = h5py.SoftLink("/elsewhere")


def replaced(name: str, **options):
    def change(file: h5py.File, outside: Path) -> None:
        data = file[name][()]
        del file[name]
        file.create_dataset(name, data=data, **options)

    return change


def group_instead(file: h5py.File, outside: Path) -> None:
    del file["layers/dense/vars/1"]
    file.create_group("layers/dense/vars/1")


def dataset_instead(file: h5py.File, outside: Path) -> None:
    del file["layers/dense/vars"]
    file["layers/dense/vars"] = np.zeros(4, np.float32)


def float_numpy_cannot_hold(chunks: tuple[int, ...] | None):
    """A float type whose exponent bias no numpy float can hold: h5py raises ValueError
    for its ``dtype`` (an error HDF5 would not have reading it)."""

    def change(file: h5py.File, outside: Path) -> None:
        del file["layers/dense/vars/1"]
        odd = h5py.h5t.IEEE_F32LE.copy()
        odd.set_ebias(2**20)
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        if chunks is not None:
            plist.set_chunk(chunks)
        space = h5py.h5s.create_simple((4,))
        h5py.h5d.create(file.id, b"layers/dense/vars/1", odd, space, dcpl=plist)

    return change


def huge_chunk_bomb(file: h5py.File, outside: Path) -> None:
    """The issue's row: shape (32,), maxshape None, one gzip chunk of 2**28 float32."""
    del file["layers/dense/vars/1"]
    file.create_dataset("layers/dense/vars/1", shape=(4,), maxshape=(None,), dtype=np.float32,
                        chunks=(2**28,), compression="gzip")  # fmt: skip


HDF5_FEATURES = {
    "external link": (external_link, "is an external link to 'layers/dense/vars/0' in"),
    "external link to a FIFO": (link_to_fifo, "(links out of the file are refused)"),
    "virtual dataset": (virtual, "is a virtual dataset (VDS): its values live in other files"),
    "external storage": (external_storage, "stores its values in other files ('/etc/passwd'"),
    "soft link": (soft_link, "'layers/dense/vars/1' is a soft link to '/spare'"),
    "soft-linked group": (soft_linked_group, "'layers' is a soft link to '/elsewhere'"),
    "gzip": (replaced("layers/dense/vars/0", chunks=(5, 4), compression="gzip"),
             "is stored with filter 'deflate' (id 1); aggregates must be uncompressed"),
    "lzf": (replaced("layers/dense/vars/0", chunks=(5, 4), compression="lzf"),
            "is stored with filter 'lzf' (id 32000)"),
    "scaleoffset": (replaced("layers/dense/vars/0", chunks=(5, 4), scaleoffset=2),
                    "filter 'scaleoffset' (id 6)"),
    "huge declared chunk": (huge_chunk_bomb, "is stored with filter 'deflate'"),
    "chunk too large": (replaced("layers/dense/vars/1", maxshape=(None,),
                                 chunks=(CHUNK_MAX_BYTES // 4 + 1,)),
                        f"declares chunks ({CHUNK_MAX_BYTES // 4 + 1},) of "
                        f"{CHUNK_MAX_BYTES + 4} bytes; at most {CHUNK_MAX_BYTES}"),
    "group, not a dataset": (group_instead, "'layers/dense/vars/1' is not a dataset"),
    "dataset, not a group": (dataset_instead, "'layers/dense/vars' is not a group, so "
                             "'layers/dense/vars/0' is missing"),
    "float numpy cannot hold": (float_numpy_cannot_hold(None),
                                "'layers/dense/vars/1' has dtype of no numpy equivalent "
                                "(Insufficient precision"),
    "chunked float numpy cannot hold": (float_numpy_cannot_hold((2,)),
                                        "has dtype of no numpy equivalent"),
    "other shape": (replaced("layers/dense/vars/1", maxshape=(None,), chunks=(8,)),
                    None),  # accepted: maxshape alone changes nothing
}  # fmt: skip


@pytest.mark.parametrize("feature", list(HDF5_FEATURES))
async def test_hdf5_features_that_leave_the_file_or_claim_memory_are_refused(
    problem: Problem, feature: str
) -> None:
    change, expected = HDF5_FEATURES[feature]
    with h5py.File(problem.aggregate, "a") as file:
        change(file, problem.outside)
    if expected is None:
        assert (await problem.examine()).weight == 3
        return
    reason = await problem.rejected(expected)
    assert str(MARKER) not in reason and "root:" not in reason  # nothing read from outside


LONG = "n" * 10_000

LONG_NAMES = {
    "soft link": (lambda file: file.__setitem__("layers/dense/vars/1", h5py.SoftLink("/" + LONG)),
                  "(only hard links are followed)"),
    "external link": (
        lambda file: file.__setitem__("layers/dense/vars/1", h5py.ExternalLink("/" + LONG, LONG)),
        "(links out of the file are refused)",
    ),
    "escaped name": (
        lambda file: file.__setitem__("layers/dense/vars/1", h5py.SoftLink("\U000e0001" * 10_000)),
        "(only hard links are followed)",
    ),
    "external storage": (
        lambda file: file.create_dataset("layers/dense/vars/1", (4,), np.float32,
                                         external=[("/" + LONG, 0, 16)]),
        "...: external storage)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("feature", list(LONG_NAMES))
async def test_a_long_name_in_a_file_leaves_the_reason_its_own_words(
    problem: Problem, feature: str
) -> None:
    """A link's target or an external file named with 10,000 characters: the reason
    still says what is wrong and what is accepted, within REASON_MAX_CHARS, and each name
    is cut to NAME_MAX_CHARS (before: the reason was cut at its end, which took the
    explanation after the name; on a long enough path, after short names too)."""
    change, expected = LONG_NAMES[feature]
    with h5py.File(problem.aggregate, "a") as file:
        del file["layers/dense/vars/1"]
        change(file)
    reason = await problem.rejected(expected)
    assert "n" * NAME_MAX_CHARS not in reason  # each name cut (its start, then its length)
    assert reason.count("\\U000e0001") < NAME_MAX_CHARS / 10  # cut after escaping


@pytest.mark.parametrize("name", ["layers", "layers/dense/vars", "layers/dense/vars/0"])
async def test_a_broken_object_header_is_the_files_fault_at_any_depth(
    problem: Problem, name: str
) -> None:
    """A hard link to an object whose header is garbage (found only when HDF5 opens it):
    a group's gave a RuntimeError, the dataset's a KeyError out of ``h5o.open``, which
    the check took for a bug of its own (an "internal error", logged with a traceback),
    and the measure of a client's upload let out."""
    with h5py.File(problem.aggregate, "r") as file:
        header = h5py.h5o.get_info(file.id, name.encode()).addr
    fd = os.open(problem.aggregate, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" * 16, header)
    finally:
        os.close(fd)
    reason = await problem.rejected("bad object header version number")
    assert reason.startswith(f"{problem.aggregate}: ")
    with pytest.raises(ContributionError, match="bad object header version number"):
        update_norm(UntrustedFile.at(problem.aggregate), problem.spec.plan)  # a client's upload


async def test_an_address_past_what_a_file_offset_holds_is_the_files_fault(
    problem: Problem,
) -> None:
    """A header may name any 64-bit address: here the superblock's driver information
    block at 2**63 + 8 (found by flipping a byte). h5py's file-object driver seeks there,
    and FileIO.seek raised OverflowError, which no one took for the file's fault (the
    check said "internal error", with a traceback)."""
    superblock = problem.aggregate.read_bytes()[:9]
    assert superblock == b"\x89HDF\r\n\x1a\n\x00"  # version 0: the address is at byte 48
    fd = os.open(problem.aggregate, os.O_WRONLY)
    try:
        os.pwrite(fd, (2**63 + 8).to_bytes(8, "little"), 48)
    finally:
        os.close(fd)
    reason = await problem.rejected("aggregate checkpoint is not a readable HDF5 file")
    assert reason.startswith(f"{problem.aggregate}: ")
    assert os.strerror(errno.EOVERFLOW) in reason


ACCEPTED = {
    "contiguous": {},
    "chunked": {"chunks": True},
    "shuffle and fletcher32": {"chunks": True, "shuffle": True, "fletcher32": True},
    "unlimited maxshape": {"maxshape": "unlimited", "chunks": True},
    "compact": {"compact": True},
}


@pytest.mark.parametrize("storage", list(ACCEPTED))
async def test_uncompressed_storage_is_averaged_with_its_values(
    problem: Problem, storage: str
) -> None:
    options = dict(ACCEPTED[storage])
    compact = options.pop("compact", False)
    arrays = update(2.0)
    with h5py.File(problem.aggregate, "w") as file:
        for name, array in arrays.items():
            if compact:
                space = h5py.h5s.create_simple(array.shape)
                plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                plist.set_layout(h5py.h5d.COMPACT)
                file.require_group(name.rsplit("/", 1)[0])
                h5py.h5d.create(file.id, name.encode(), h5py.h5t.IEEE_F32LE, space, dcpl=plist)
                file[name][...] = array
            elif options.get("maxshape") == "unlimited":
                file.create_dataset(name, data=array, chunks=True, maxshape=(None,) * array.ndim)
            else:
                file.create_dataset(name, data=array, **options)
    checked = await problem.examine()
    assert (checked.selector, checked.weight) == ("sel", 3)
    tmp = problem.root / "tmp"
    aggregate(problem.checkpoint, [checked], tmp)
    with h5py.File(problem.checkpoint, "r") as file:
        for name, array in GLOBAL.items():
            expected = (array.astype(np.float64) + 2.0 / 3).astype(np.float32)
            np.testing.assert_array_equal(file[name][()], expected)


async def test_a_file_replaced_after_its_check_is_refused_by_the_aggregation(
    problem: Problem,
) -> None:
    checked = await problem.examine()
    write(problem.root / "other", update(MARKER))
    os.replace(problem.root / "other", problem.aggregate)  # same name, another file
    before = problem.checkpoint.read_bytes()
    with pytest.raises(ContributionsRefused) as raised:
        aggregate(problem.checkpoint, [checked], problem.root / "tmp")
    assert raised.value.reasons == {
        "sel": f"{problem.aggregate}: aggregate checkpoint changed after it was checked"
    }
    assert problem.checkpoint.read_bytes() == before


@pytest.mark.parametrize("lanes", [1, 2])
async def test_a_file_rewritten_in_place_while_averaged_is_refused(
    problem: Problem, monkeypatch: pytest.MonkeyPatch, lanes: int
) -> None:
    """Seen by the last check before the rename; with two lanes, the second may see it
    first, when it opens the file for its own first array."""
    monkeypatch.setattr(aggregation, "LANES", lanes)
    checked = await problem.examine()
    before = problem.checkpoint.read_bytes()
    rewrite = aggregation._rewrite

    def rewritten_meanwhile(template, inputs, dest, tmp_dir, combine, step, *rest, **named):
        def step_and_write(*slab):  # the selector appends while we average
            with open(problem.aggregate, "ab") as file:
                file.write(b"\0")
            step(*slab)

        return rewrite(template, inputs, dest, tmp_dir, combine, step_and_write, *rest, **named)

    monkeypatch.setattr(aggregation, "_rewrite", rewritten_meanwhile)
    with pytest.raises(ContributionsRefused) as raised:
        aggregate(problem.checkpoint, [checked], problem.root / "tmp")
    seen = {f"{problem.aggregate}: aggregate checkpoint changed while it was being averaged"}
    if lanes == 2:
        seen.add(f"{problem.aggregate}: aggregate checkpoint changed after it was checked")
    assert list(raised.value.reasons) == ["sel"]
    assert raised.value.reasons["sel"] in seen
    assert problem.checkpoint.read_bytes() == before
    assert list((problem.root / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a" * 1000, "a" * 95 + "…[1000 chars]…" + "a" * 191),
        (
            "/long" * 100 + ": is a FIFO",
            "/long" * 19 + "…[511 chars]…g" + "/long" * 36 + ": is a FIFO",
        ),
        ("bell\x07 and \x1b[31mred\u202e", "bell\\x07 and \\x1b[31mred\\u202e"),
        ("line\nbreak", "line\\nbreak"),
    ],
)
def test_text_from_files_is_escaped_and_cut(text: str, expected: str) -> None:
    """Cut, a reason keeps its start (which file) and its end (what is wrong with it)."""
    assert clip(text) == expected
    assert len(clip(text)) <= REASON_MAX_CHARS


def _one_array_problem(
    tmp_path: Path, shape: tuple[int, ...]
) -> tuple[Path, CheckpointSpec, SelectorFiles]:
    """A root whose checkpoint holds one float32 array of ``shape`` (norms measured), and a
    selector ``sel`` of weight 1 whose aggregate ``agg`` the test writes."""
    root = tmp_path / "root"
    (root / "sel").mkdir(parents=True)
    checkpoint = write(root / "fl_checkpoint", {"layers/w/vars/0": np.zeros(shape, np.float32)})
    spec = CheckpointSpec(read_checkpoint_plan(checkpoint), checkpoint.stat().st_size, True)
    (root / "sel" / "weight").write_text("1")
    return root, spec, SelectorFiles(root, "agg", "weight")


@pytest.mark.parametrize(
    ("shape", "chunks"),
    [((1, 2**21), (1, 2**21)), ((2**16, 32), (2**16, 1))],
    ids=["one wide row in one chunk", "column chunks across every slab"],
)
def test_the_check_reads_each_chunk_once(
    tmp_path: Path, shape: tuple[int, ...], chunks: tuple[int, ...]
) -> None:
    """A chunk is read whole (checksummed, unshuffled) whatever part of it a slab wants, and
    untrusted files get no chunk cache: read in C-order slabs, an 8 MiB chunk spanning 8
    slabs was read 8 times (64 MiB for these 8 MiB arrays). Read whole chunks at a time,
    each once; the norm and the NaN test see every value."""
    values = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    root, spec, files = _one_array_problem(tmp_path, shape)
    name = spec.plan[0].name
    options = {"chunks": chunks, "shuffle": True, "fletcher32": True}
    size = write(root / "sel" / "agg", {name: values}, **options).stat().st_size
    before = bytes_read()
    checked = examine("sel", files, spec)
    read = bytes_read() - before
    assert size <= read < 1.25 * size, (read, size)
    assert checked.square_norm == pytest.approx(np.sum(values.astype(np.float64) ** 2), rel=1e-12)
    values[-1, -1] = np.nan  # in the last chunk read
    write(root / "sel" / "agg", {name: values}, **options)
    with pytest.raises(ContributionError, match="contains NaN or Inf"):
        examine("sel", files, spec)


def test_the_check_reads_plain_values_with_preadv_not_h5py(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A contiguous dataset (what Keras writes) is checked slab by slab with ``preadv`` at
    the offset HDF5 gives, not through h5py's read path (ten times as dear for a small
    file); every value is still seen: the norm is exact, a NaN in the last slab rejects."""
    shape = (3 * 2**16 + 5, 4)  # 3 MiB of float32: four slabs, the last one short
    values = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    root, spec, files = _one_array_problem(tmp_path, shape)
    name = spec.plan[0].name
    write(root / "sel" / "agg", {name: values})
    h5py_reads: list[object] = []
    monkeypatch.setattr(h5py.Dataset, "read_direct", lambda *args, **kw: h5py_reads.append(args))
    checked = examine("sel", files, spec)
    assert h5py_reads == []
    assert checked.square_norm == pytest.approx(np.sum(values.astype(np.float64) ** 2), rel=1e-12)
    assert checked.plain is not None and list(checked.plain) == [name]
    values[-1, -1] = np.nan
    write(root / "sel" / "agg", {name: values})
    with pytest.raises(ContributionError, match="contains NaN or Inf"):
        examine("sel", files, spec)
    assert h5py_reads == []


OUT_OF_DESCRIPTORS = """
import os, resource, sys
from pathlib import Path
from fl_coordinator.errors import CheckpointError
from fl_coordinator.storage.aggregation import Contribution, aggregate
from fl_coordinator.storage.untrusted import UntrustedFile

root = Path(sys.argv[1])
aggregate_file = UntrustedFile(root, "sel/fl_agg_checkpoint")
spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(8)]  # room for the rest of the run
resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))) + 1,
                                            resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    aggregate_file.open_fd("aggregate checkpoint")
except OSError as error:
    print("open_fd:", type(error).__name__, error.errno)
else:
    print("open_fd: opened")
for fd in spare[:4]:
    os.close(fd)
try:
    aggregate(root / "fl_checkpoint", [Contribution("sel", aggregate_file, 3)], root / "tmp")
except CheckpointError as error:
    print("aggregate:", error)
"""


def test_out_of_descriptors_is_the_coordinators_error_not_the_selectors(problem: Problem) -> None:
    """Opening a selector's file when the coordinator has no descriptor left: the OSError
    (EMFILE) is raised as ours, and a pass that meets it fails as the coordinator's own
    (a CheckpointError that says so), not as a selector's fault (before: a
    ContributionError, "cannot be opened (Too many open files)", refused the selector)."""
    (problem.root / "tmp").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", OUT_OF_DESCRIPTORS, str(problem.root)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "open_fd: OwnShortage 24", result.stdout
    assert lines[1].startswith("aggregate: the coordinator ran out of its own resources"), lines
    assert "raise its RLIMIT_NOFILE" in lines[1]


@pytest.mark.parametrize("code", sorted(OURS))
def test_an_errno_of_ours_is_believed_only_when_the_process_is_short_itself(code: int) -> None:
    """A selector's file system may answer EMFILE (or ENFILE, ENOMEM, ENOBUFS) to anything
    (tests with a FUSE server: tests/storage/test_checker.py): it is the coordinator's own
    shortage only if the process cannot open a descriptor either (here: really out of
    descriptors, RLIMIT_NOFILE lowered to the lowest free one)."""
    said = OSError(code, os.strerror(code), "selector/fl_agg_checkpoint")
    assert not selector_error_is_own_shortage(said)
    with out_of_descriptors():
        short = selector_error_is_own_shortage(said)
    assert short
    assert not selector_error_is_own_shortage(OSError(errno.EIO, "I/O error"))
