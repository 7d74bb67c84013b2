"""Plain datasets read without HDF5: the same bits as h5py, nothing outside the file,
descriptors and open files flat in the number of inputs."""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers.peers import read_floats

from fl_coordinator.errors import CheckpointError, ContributionError, ContributionsRefused
from fl_coordinator.storage import aggregation, slab
from fl_coordinator.storage.aggregation import Contribution, aggregate
from fl_coordinator.storage.contribution import CheckpointSpec, SelectorFiles, examine
from fl_coordinator.storage.plain import Extent, extent_of, reserve
from fl_coordinator.storage.untrusted import UntrustedFile
from fl_coordinator.storage.weights import read_plan


def _arrays(seed: int, rows: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layers/dense/vars/0": (rng.normal(size=(rows, 5)) * 10).astype(np.float32),
        "layers/dense/vars/1": rng.normal(size=(5,)).astype(np.float64),
        "layers/out/vars/0": rng.normal(size=(5, 3)).astype(np.float16),
        "layers/scalar": np.array(rng.normal(), np.float32),
    }


def _write(path: Path, arrays: dict[str, np.ndarray], chunked: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as file:
        for name, array in arrays.items():
            file.create_dataset(name, data=array, chunks=True if chunked and array.ndim else None)
    return path


def _parts(folder: Path, count: int, chunked: Collection[int] = ()) -> list[Contribution]:
    """``count`` selectors' aggregates (weights 1, 2, ...); those in ``chunked`` chunked."""
    parts = []
    for i in range(count):
        _write(folder / f"s{i}" / "agg", _arrays(i + 1), chunked=i in chunked)
        parts.append(Contribution(f"s{i}", UntrustedFile(folder, f"s{i}/agg"), i + 1))
    return parts


def test_extent_is_where_h5py_reads_the_values(tmp_path: Path) -> None:
    arrays = _arrays(3)
    path = _write(tmp_path / "f.h5", arrays)
    data = path.read_bytes()
    with h5py.File(path, "r") as file:
        for name, array in arrays.items():
            extent = extent_of(file[name], array.dtype, len(data), path)
            assert extent is not None
            found = np.frombuffer(data[extent.offset : extent.offset + extent.nbytes], array.dtype)
            np.testing.assert_array_equal(found.reshape(array.shape), array)
            assert (extent.shape, extent.itemsize) == (array.shape, array.dtype.itemsize)


def test_other_layouts_are_left_to_h5py(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("chunked", data=np.ones((8, 2), np.float32), chunks=(2, 2))
        file.create_dataset("gzip", data=np.ones((8, 2), np.float32), compression="gzip")
        file.create_dataset("big_endian", data=np.ones((8, 2), ">f4"))
        file.create_dataset("unwritten", shape=(8, 2), dtype=np.float32)
    size = path.stat().st_size
    with h5py.File(path, "r") as file:
        found = {
            name: extent_of(file[name], np.dtype(np.float32), size, path)
            for name in ("chunked", "gzip", "big_endian", "unwritten")
        }
    assert found == dict.fromkeys(found)


def test_plain_and_h5py_paths_give_the_same_bits(tmp_path: Path) -> None:
    """The same inputs read plain, chunked (through h5py) and mixed, and the result written
    with pwrite (a plain checkpoint) or through h5py (a chunked one): identical bits."""
    results, early = [], []
    runs = [({0, 1, 2}, False), (set(), False), ({1}, False), (set(), True)]
    for run, (chunked, chunked_checkpoint) in enumerate(runs):
        folder = tmp_path / str(run)
        checkpoint = _write(folder / "fl_checkpoint", _arrays(0), chunked=chunked_checkpoint)
        aggregate(checkpoint, _parts(folder, 3, chunked), folder / "tmp")
        results.append(read_floats(checkpoint))
        with h5py.File(checkpoint, "r") as file:
            plist = file["layers/dense/vars/0"].id.get_create_plist()
            early.append(plist.get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY)
    assert early == [True, True, True, False]  # pwrite where the checkpoint is plain
    for name in results[0]:
        for other in results[1:]:
            assert results[0][name].tobytes() == other[name].tobytes(), name
    assert not np.array_equal(results[0]["layers/dense/vars/0"], _arrays(0)["layers/dense/vars/0"])


def _move_data_address(path: Path, name: str, new_offset: int) -> None:
    """Rewrite the address in ``name``'s layout message (HDF5 object header v1, unchecked)."""
    with h5py.File(path, "r") as file:
        offset = file[name].id.get_offset()
        nbytes = file[name].id.get_storage_size()
    data = bytearray(path.read_bytes())
    needle = struct.pack("<QQ", offset, nbytes)
    assert data.count(needle) == 1
    at = data.index(needle)
    data[at : at + 8] = struct.pack("<Q", new_offset)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["past_end", "straddles_end"])
def test_data_said_to_lie_outside_the_file_refuses_that_input(tmp_path: Path, where: str) -> None:
    checkpoint = _write(tmp_path / "fl_checkpoint", _arrays(0))
    parts = _parts(tmp_path, 2)
    bad = parts[1].checkpoint.path
    size = bad.stat().st_size
    _move_data_address(bad, "layers/dense/vars/0", size + 64 if where == "past_end" else size - 8)
    before = checkpoint.read_bytes()
    with pytest.raises(ContributionsRefused) as refused:
        aggregate(checkpoint, parts, tmp_path / "tmp")
    assert list(refused.value.reasons) == ["s1"]  # HDF5 itself sees it (invalid dataset size)
    assert "layers/dense/vars/0" in refused.value.reasons["s1"]
    assert checkpoint.read_bytes() == before


def test_extent_past_the_size_seen_at_open_is_refused(tmp_path: Path) -> None:
    """HDF5 checks addresses against the file's end when it opens it; the extent is checked
    again against the size ``fstat`` gave (the file may have been cut since)."""
    path = _write(tmp_path / "f.h5", _arrays(1))
    with h5py.File(path, "r") as file:
        dataset = file["layers/dense/vars/0"]
        end = dataset.id.get_offset() + dataset.id.get_storage_size()
        assert extent_of(dataset, dataset.dtype, end, path) is not None
        with pytest.raises(ContributionError, match="outside the file's"):
            extent_of(dataset, dataset.dtype, end - 1, path)


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_descriptors_flat_in_the_number_of_inputs(tmp_path: Path, monkeypatch) -> None:
    """300 inputs averaged under a descriptor limit of what is open now + 100."""
    checkpoint = _write(tmp_path / "fl_checkpoint", _arrays(0))
    parts = _parts(tmp_path, 300)
    monkeypatch.setattr(slab, "SLAB_BYTES", 64)  # several slabs: inputs read again
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_open_descriptors() + 100, hard))
    try:
        result = aggregate(checkpoint, parts, tmp_path / "tmp")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (result.arrays, result.total_weight) == (4, sum(range(1, 301)))
    expected = _arrays(0)["layers/dense/vars/1"] + sum(
        _arrays(i + 1)["layers/dense/vars/1"] for i in range(300)
    ) / sum(range(1, 301))
    np.testing.assert_allclose(read_floats(checkpoint)["layers/dense/vars/1"], expected)


def _checked(
    folder: Path, checkpoint: Path, count: int, chunked: Collection[int]
) -> list[Contribution]:
    """``count`` selectors' files (weights 1, 2, ...), checked as a report's check does."""
    for i in range(count):
        _write(folder / f"s{i}" / "agg", _arrays(i + 1), chunked=i in chunked)
        (folder / f"s{i}" / "weight").write_text(f"{i + 1}\n")
    with h5py.File(checkpoint, "r") as file:
        spec = CheckpointSpec(read_plan(file, checkpoint), checkpoint.stat().st_size)
    files = SelectorFiles(folder, "agg", "weight")
    return [examine(f"s{i}", files, spec) for i in range(count)]


def test_the_check_locates_plain_arrays_and_the_aggregation_does_not_parse_them_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read of each file's structure (the check, in its worker): the aggregation reads
    a plain input's values at the extents its check found; a chunked one through h5py."""
    checkpoint = _write(tmp_path / "fl_checkpoint", _arrays(0))
    parts = _checked(tmp_path, checkpoint, 3, chunked={1})
    plan_names = list(_arrays(0))
    assert [None if p.plain is None else list(p.plain) for p in parts] == [
        plan_names, None, plan_names
    ]  # fmt: skip
    opened: list[str] = []
    open_hdf5 = UntrustedFile.open_hdf5

    def counted(self: UntrustedFile, *args: object, **kwargs: object) -> object:
        opened.append(self.name)
        return open_hdf5(self, *args, **kwargs)

    monkeypatch.setattr(UntrustedFile, "open_hdf5", counted)
    before = checkpoint.read_bytes()
    aggregate(checkpoint, parts, tmp_path / "tmp")
    assert opened == ["s1/agg"]  # only the chunked input was parsed again
    located = read_floats(checkpoint)
    checkpoint.write_bytes(before)
    aggregate(checkpoint, [replace(p, plain=None) for p in parts], tmp_path / "tmp")
    again = read_floats(checkpoint)
    assert opened == ["s1/agg", "s0/agg", "s1/agg", "s2/agg"]
    for name in plan_names:
        assert located[name].tobytes() == again[name].tobytes(), name


def test_extents_found_for_another_shape_are_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a slab lies depends on the array's shape: extents said to be of other shapes
    than the plan's (the same bytes) are not read with the plan's slabs; that input is
    located again, and the average is the same bits."""
    monkeypatch.setattr(slab, "SLAB_BYTES", 64)  # several slabs per array
    checkpoint = _write(tmp_path / "fl_checkpoint", _arrays(0))
    parts = _checked(tmp_path, checkpoint, 2, chunked=())
    before = checkpoint.read_bytes()
    aggregate(checkpoint, parts, tmp_path / "tmp")
    expected = read_floats(checkpoint)
    checkpoint.write_bytes(before)
    assert parts[0].plain is not None
    transposed = {
        name: (replace(extent, shape=extent.shape[::-1]), encoding)
        for name, (extent, encoding) in parts[0].plain.items()
    }
    aggregate(checkpoint, [replace(parts[0], plain=transposed), parts[1]], tmp_path / "tmp")
    for name, values in read_floats(checkpoint).items():
        assert values.tobytes() == expected[name].tobytes(), name


def test_a_plain_input_changed_after_its_check_is_refused_alone(tmp_path: Path) -> None:
    checkpoint = _write(tmp_path / "fl_checkpoint", _arrays(0))
    parts = _checked(tmp_path, checkpoint, 3, chunked=())
    _write(tmp_path / "s2" / "agg", _arrays(99))  # same layout and size, other values
    before = checkpoint.read_bytes()
    with pytest.raises(ContributionsRefused) as refused:
        aggregate(checkpoint, parts, tmp_path / "tmp")
    assert list(refused.value.reasons) == ["s2"]
    assert "changed" in refused.value.reasons["s2"]
    assert checkpoint.read_bytes() == before


@pytest.mark.parametrize("where", ["past_end", "straddles_end"])
def test_a_global_checkpoint_whose_data_lies_outside_it_fails_the_average(
    tmp_path: Path, where: str
) -> None:
    """A fault of the global checkpoint's arrays is the checkpoint's (CheckpointError, naming
    the file and the array), not a selector's refusal, and not a raw KeyError of h5py."""
    checkpoint = _write(tmp_path / "fl_checkpoint", _arrays(0))
    parts = _parts(tmp_path, 2)
    size = checkpoint.stat().st_size
    _move_data_address(
        checkpoint, "layers/dense/vars/0", size + 64 if where == "past_end" else size - 8
    )
    before = checkpoint.read_bytes()
    with pytest.raises(CheckpointError, match="layers/dense/vars/0") as failed:
        aggregate(checkpoint, parts, tmp_path / "tmp")
    assert str(failed.value).startswith(str(checkpoint))
    assert checkpoint.read_bytes() == before
    assert list((tmp_path / "tmp").glob("*")) == []


def test_reserve_allocates_the_blocks_before_they_are_written(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "new", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert os.fstat(fd).st_blocks == 0
        reserve(fd, 3 * 2**20 + 5)
        stat = os.fstat(fd)
    finally:
        os.close(fd)
    assert stat.st_blocks * 512 >= 3 * 2**20 + 5
    assert stat.st_size == 3 * 2**20 + 5


_AVERAGE_IN_A_PROCESS = """
import sys
from pathlib import Path
from fl_coordinator.core.strategy import ServerOptimizer, Strategy
from fl_coordinator.storage.aggregation import Contribution, ServerUpdate, aggregate
from fl_coordinator.storage.strategy_state import StateUpdate
from fl_coordinator.storage.untrusted import UntrustedFile
folder, optimizer = Path(sys.argv[1]), ServerOptimizer.of(sys.argv[2])
parts = [Contribution(f"s{i}", UntrustedFile(folder, f"s{i}/agg"), i + 1) for i in range(2)]
state = None
for round_number in (1, 2):  # the second reads the state the first wrote
    update = None
    if optimizer.moments:
        dest = folder / f"state{round_number}.h5"
        kept = StateUpdate(optimizer, state, dest, round_number)
        update = ServerUpdate(Strategy(optimizer), kept)
        state = dest
    aggregate(folder / "fl_checkpoint", parts, folder / "tmp", None, update)
"""


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
@pytest.mark.parametrize("driver", ["stdio", "core"])
def test_the_average_does_not_depend_on_hdf5s_default_driver(
    tmp_path: Path, driver: str, strategy: str
) -> None:
    """HDF5_DRIVER (read by HDF5 at start) changes the default file driver: the template's
    "descriptor" was then a FILE * or a buffer's address (EBADF, reported as a failed write),
    and core would rewrite the new file from memory over the values pwritten into it (the
    optimizer's state too)."""
    results = {}
    for name, environ in (("sec2", {}), (driver, {"HDF5_DRIVER": driver})):
        folder = tmp_path / name
        _write(folder / "fl_checkpoint", _arrays(0))
        _parts(folder, 2)
        subprocess.run(
            [sys.executable, "-c", _AVERAGE_IN_A_PROCESS, str(folder), strategy],
            env={**os.environ, **environ},
            check=True,
            capture_output=True,
        )
        results[name] = read_floats(folder / "fl_checkpoint")
        if strategy != "fedavg":
            state = read_floats(folder / "state2.h5")
            results[name].update({f"state/{key}": value for key, value in state.items()})
    assert (
        results["sec2"]["layers/dense/vars/0"].tobytes()
        != _arrays(0)["layers/dense/vars/0"].tobytes()
    )
    for name, values in results["sec2"].items():
        assert values.tobytes() == results[driver][name].tobytes(), name


@pytest.mark.parametrize("change", ["written to", "replaced"])
def test_a_global_checkpoint_changed_while_averaged_is_not_published_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """Another process rewrites the global checkpoint's values in place, or replaces the
    file, after the pass read its first slab: was COMPLETED with a mix of old and new
    values (in place), or the replacement overwritten by a result of the old file."""
    monkeypatch.setattr(slab, "SLAB_BYTES", 64)  # several slabs per array
    checkpoint = _write(tmp_path / "fl_checkpoint", _arrays(0))
    parts = _parts(tmp_path, 2)
    theirs = _write(tmp_path / "theirs", _arrays(9))
    read = aggregation.read_slab
    template_reads: list[int] = []

    def meanwhile(fd: int, extent: Extent, *args: object) -> np.ndarray:
        if args[-1] == checkpoint:
            template_reads.append(fd)
            if len(template_reads) == 2:
                if change == "replaced":
                    os.replace(theirs, checkpoint)
                else:
                    with h5py.File(checkpoint, "r") as file:
                        at = file["layers/dense/vars/0"].id.get_offset()
                    with checkpoint.open("r+b") as file:
                        file.seek(at)
                        file.write(bytes(4 * 7 * 5))
        return read(fd, extent, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(aggregation, "read_slab", meanwhile)
    expected = checkpoint.read_bytes() if change == "replaced" else None
    with pytest.raises(CheckpointError) as failed:
        aggregate(checkpoint, parts, tmp_path / "tmp")
    said = "replaced or removed" if change == "replaced" else change
    assert str(failed.value) == (
        f"{checkpoint}: the global checkpoint was {said} "
        "by another process while it was being averaged; the result is not published "
        "(run one coordinator per problem folder, and leave its initFiles to it)"
    )
    assert len(template_reads) > 2
    if expected is None:  # theirs, in place: the zeros written, nothing of ours
        assert not read_floats(checkpoint)["layers/dense/vars/0"].any()
    else:
        assert checkpoint.read_bytes() != expected
        assert (
            read_floats(checkpoint)["layers/dense/vars/0"].tobytes()
            == _arrays(9)["layers/dense/vars/0"].tobytes()
        )
    assert list((tmp_path / "tmp").iterdir()) == []


def _at_address_zero(path: Path, name: str) -> None:
    """Rewrite the address in ``name``'s layout message (contiguous: address, size) to 0:
    HDF5 then says its values lie at the superblock, and cannot give that offset."""
    with h5py.File(path, "r") as file:
        dataset = file[name]
        message = struct.pack("<QQ", dataset.id.get_offset(), dataset.id.get_storage_size())
    data = path.read_bytes()
    assert data.count(message) == 1
    path.write_bytes(data.replace(message, bytes(8) + message[8:]))


@pytest.mark.parametrize("whose", ["template", "input"])
def test_an_array_at_address_zero_is_a_specific_error(tmp_path: Path, whose: str) -> None:
    """H5Dget_offset fails for an address of 0: a raw RuntimeError (an internal error,
    every selector lost) became a CheckpointError, or that input's refusal."""
    checkpoint = _write(tmp_path / "fl_checkpoint", _arrays(0))
    parts = _parts(tmp_path, 2)
    broken = checkpoint if whose == "template" else parts[1].checkpoint.path
    _at_address_zero(broken, "layers/dense/vars/0")
    said = (
        f"{broken}: dataset '/layers/dense/vars/0': HDF5 cannot say where its values lie "
        "(Unspecified error in H5Dget_offset (return value ==0))"
    )
    if whose == "template":
        with pytest.raises(CheckpointError) as failed:
            aggregate(checkpoint, parts, tmp_path / "tmp")
        assert str(failed.value) == said
    else:
        with pytest.raises(ContributionsRefused) as refused:
            aggregate(checkpoint, parts, tmp_path / "tmp")
        assert refused.value.reasons == {"s1": said}
    assert list((tmp_path / "tmp").glob("*")) == []  # made only when writing began


def test_a_stored_size_other_than_the_shape_says_so(tmp_path: Path) -> None:
    """A layout whose stored size is not what the shape holds is refused with both sizes
    (not as data lying outside the file: it may lie well inside)."""
    path = _write(tmp_path / "f.h5", _arrays(1))
    with h5py.File(path, "r") as file:
        dataset = file["layers/dense/vars/0"]
        offset, nbytes = dataset.id.get_offset(), dataset.id.get_storage_size()
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<QQ", offset, nbytes))
    data[at + 8 : at + 16] = struct.pack("<Q", nbytes - 4)
    path.write_bytes(bytes(data))
    with h5py.File(path, "r") as file:
        dataset = file["layers/dense/vars/0"]
        with pytest.raises(ContributionError) as refused:
            extent_of(dataset, dataset.dtype, path.stat().st_size, path)
    assert f"stores {nbytes - 4} bytes for the {nbytes}" in str(refused.value)
    assert "outside" not in str(refused.value)
