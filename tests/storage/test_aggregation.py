"""FedAvg over HDF5: the arithmetic, the layout kept as it was, and bad inputs
that leave the global checkpoint byte-for-byte untouched."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers.peers import assert_arrays_close, fedavg, read_floats
from helpers.selector_fs import mounted, needs_fuse

from fl_coordinator.errors import AggregationError, ContributionError, ContributionsRefused
from fl_coordinator.storage import slab
from fl_coordinator.storage.aggregation import Contribution, aggregate
from fl_coordinator.storage.contribution import read_weight
from fl_coordinator.storage.model import builtin_model
from fl_coordinator.storage.untrusted import UntrustedFile


def leftovers(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.exists() else []


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_h5(path: Path, arrays: dict[str, np.ndarray], extras: bool = False) -> Path:
    """A checkpoint-like file; with ``extras``, non-float data and attributes too."""
    with h5py.File(path, "w") as file:
        for name, array in arrays.items():
            file.create_dataset(name, data=array)
        if extras:
            file.attrs["keras_version"] = "3.x"
            file["layers"].attrs["names"] = np.array([b"dense", b"out"])
            file.create_dataset("meta/step", data=np.int64(6))  # a counter: kept
            file.create_dataset("meta/flags", data=np.array([True, False]))
            kinds = h5py.enum_dtype({"dense": 0, "out": 1}, basetype="i1")
            file.create_dataset("meta/kinds", data=np.array([0, 1], np.int8), dtype=kinds)
            file.create_dataset("meta/label", data="digits", dtype=h5py.string_dtype())
            file["layers/dense/vars/0"].attrs["unit"] = "weight"
            file["layers/out"].attrs.create("scale", 2.5, dtype=np.float16)
            file.create_dataset(  # chunked and compressed: must stay so
                "layers/extra/vars/0", data=np.ones((40, 3), np.float32), chunks=(8, 3),
                compression="gzip", compression_opts=4, fillvalue=7.0,
            )  # fmt: skip
    return path


def layout_of(path: Path) -> dict[str, object]:
    """Everything of an HDF5 file but its float values: objects, attributes, storage."""
    found: dict[str, object] = {}
    with h5py.File(path, "r") as file:

        def attrs(obj: h5py.HLObject) -> list[tuple[str, object, object, object]]:
            spec = obj.attrs.get_id
            return [(k, repr(obj.attrs[k]), spec(k).dtype, spec(k).shape) for k in obj.attrs]

        def visit(name: str, obj: h5py.HLObject) -> None:
            if isinstance(obj, h5py.Dataset):
                storage = (obj.dtype, obj.shape, obj.chunks, obj.compression,
                           obj.compression_opts, obj.fillvalue)  # fmt: skip
                values = None if obj.dtype.kind == "f" else repr(obj[()])
                found[name] = ("dataset", storage, values, attrs(obj))
            else:
                found[name] = ("group", attrs(obj))

        found["/"] = ("root", attrs(file))
        file.visititems(visit)
    return found


def contribution(
    tmp_path: Path, name: str, arrays: dict[str, np.ndarray], weight: int
) -> Contribution:
    folder = tmp_path / name
    folder.mkdir()
    write_h5(folder / "fl_agg_checkpoint", arrays)
    return Contribution(name, UntrustedFile(tmp_path, f"{name}/fl_agg_checkpoint"), weight)


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "layers/dense/vars/0": rng.normal(size=(5, 4)).astype(np.float32),
        "layers/dense/vars/1": rng.normal(size=(4,)).astype(np.float32),
        "layers/out/vars/0": rng.normal(size=(4, 2)).astype(np.float64),
        "layers/out/vars/1": rng.normal(size=(2,)).astype(np.float16),
    }


def updates_like(arrays: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=v.shape) * 10).astype(v.dtype) for k, v in arrays.items()}


def test_fedavg_of_every_float_dtype_in_its_own_dtype(tmp_path: Path, arrays) -> None:
    checkpoint = write_h5(tmp_path / "fl_checkpoint", arrays)
    parts = [
        contribution(tmp_path, "s1", updates_like(arrays, 1), 3),
        contribution(tmp_path, "s2", updates_like(arrays, 2), 5),
    ]
    expected = fedavg(arrays, [(p.checkpoint.path, p.weight) for p in parts])
    result = aggregate(checkpoint, parts, tmp_path / "tmp")
    assert (result.arrays, result.total_weight) == (4, 8)
    assert_arrays_close(read_floats(checkpoint), expected)
    # The float64 accumulation really is float64: recompute one value by hand.
    a1, a2 = (read_floats(p.checkpoint.path)["layers/out/vars/0"] for p in parts)
    by_hand = arrays["layers/out/vars/0"][0, 0] + (a1[0, 0] + a2[0, 0]) / 8
    assert read_floats(checkpoint)["layers/out/vars/0"][0, 0] == pytest.approx(by_hand, rel=1e-12)
    assert leftovers(tmp_path / "tmp") == []


def test_non_float_datasets_groups_and_attributes_are_copied_unchanged(
    tmp_path: Path, arrays
) -> None:
    checkpoint = write_h5(tmp_path / "fl_checkpoint", arrays, extras=True)
    before = layout_of(checkpoint)
    extra = {"layers/extra/vars/0": np.full((40, 3), 0.5, np.float32)}
    update = contribution(tmp_path, "s1", {**updates_like(arrays, 1), **extra}, 2)
    aggregate(checkpoint, [update], tmp_path / "tmp")
    assert layout_of(checkpoint) == before
    assert read_floats(checkpoint)["layers/extra/vars/0"][0, 0] == pytest.approx(1.25)
    with h5py.File(checkpoint, "r") as file:
        assert file.attrs["keras_version"] == "3.x"
        assert list(file["layers"].attrs["names"]) == [b"dense", b"out"]
        assert file["layers/dense/vars/0"].attrs["unit"] == "weight"
        assert (file["meta/step"][()], file["meta/step"].dtype) == (6, np.int64)
        np.testing.assert_array_equal(file["meta/flags"][()], [True, False])
        np.testing.assert_array_equal(file["meta/kinds"][()], [0, 1])
        assert h5py.check_enum_dtype(file["meta/kinds"].dtype) == {"dense": 0, "out": 1}
        assert file["meta/label"][()] == b"digits"
        assert sorted(file["meta"]) == ["flags", "kinds", "label", "step"]


def test_keras_weights_file(tmp_path: Path, layout, keras_weights) -> None:
    before = read_floats(layout.checkpoint)
    parts = [
        Contribution(f"s{index}", UntrustedFile.at(path), index + 1)
        for index, path in enumerate(keras_weights[:3])
    ]
    kept = layout_of(layout.checkpoint)
    aggregate(layout.checkpoint, parts, layout.tmp)
    expected = fedavg(before, [(p.checkpoint.path, p.weight) for p in parts])
    assert_arrays_close(read_floats(layout.checkpoint), expected)
    assert len(expected) == 4  # two Dense layers: kernel and bias each
    assert layout_of(layout.checkpoint) == kept
    # And Keras itself loads the new checkpoint into the model, with those values.
    model = builtin_model()
    shutil.copyfile(layout.checkpoint, tmp_path / "new.weights.h5")
    model.load_weights(tmp_path / "new.weights.h5")
    kernel = expected["layers/dense/vars/0"]
    np.testing.assert_array_equal(model.get_weights()[0], kernel)


BAD_AGGREGATES = {
    "missing": (lambda p: p.unlink(), "is missing"),
    "not HDF5": (lambda p: p.write_bytes(b"this is not hdf5" * 100), "not a readable HDF5"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:1000]), "not a readable HDF5"),
}


@pytest.mark.parametrize("case", sorted(BAD_AGGREGATES))
def test_bad_aggregate_file_leaves_checkpoint_untouched(tmp_path: Path, arrays, case: str) -> None:
    checkpoint = write_h5(tmp_path / "fl_checkpoint", arrays)
    before = digest(checkpoint)
    good = contribution(tmp_path, "good", updates_like(arrays, 1), 2)
    bad = contribution(tmp_path, "bad", updates_like(arrays, 2), 2)
    damage, message = BAD_AGGREGATES[case]
    damage(bad.checkpoint.path)
    with pytest.raises(ContributionsRefused, match=message) as raised:
        aggregate(checkpoint, [good, bad], tmp_path / "tmp")
    assert list(raised.value.reasons) == ["bad"]  # the good one is not blamed
    assert str(bad.checkpoint.path) in raised.value.reasons["bad"]
    assert digest(checkpoint) == before
    assert leftovers(tmp_path / "tmp") == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("layers/out/vars/0"), "'layers/out/vars/0' is missing"),
        (lambda a: a.update({"layers/dense/vars/1": np.zeros(5, np.float32)}), "has shape"),
        (lambda a: a.update({"layers/dense/vars/1": np.zeros(4, np.float16)}), "has dtype"),
        (lambda a: a["layers/dense/vars/0"].__setitem__((0, 0), np.nan), "NaN or Inf"),
        (lambda a: a["layers/dense/vars/0"].__setitem__((1, 1), np.inf), "NaN or Inf"),
    ],
    ids=["missing dataset", "shape", "dtype", "nan", "inf"],
)
def test_mismatched_aggregate_leaves_checkpoint_untouched(
    tmp_path: Path, arrays, change, message: str
) -> None:
    checkpoint = write_h5(tmp_path / "fl_checkpoint", arrays)
    before = digest(checkpoint)
    updates = updates_like(arrays, 3)
    change(updates)
    bad = contribution(tmp_path, "bad", updates, 4)
    with pytest.raises(ContributionsRefused, match=message):
        aggregate(checkpoint, [bad], tmp_path / "tmp")
    assert digest(checkpoint) == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("  \n", "is empty"),
        ("12abc", "not a decimal integer"),
        ("-3", "not a decimal integer"),
        ("0", "at least 1"),
        ("1.5", "not a decimal integer"),
        (str(2**60), "absurdly large"),
    ],
)
def test_bad_weight_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fl_agg_checkpoint_weight"
    path.write_text(text)
    with pytest.raises(ContributionError, match=message):
        read_weight(UntrustedFile.at(path))


def test_weight_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ContributionError, match="weight file is missing"):
        read_weight(UntrustedFile.at(tmp_path / "nothing"))
    (tmp_path / "ok").write_text("42\n")
    assert read_weight(UntrustedFile.at(tmp_path / "ok")) == 42


def test_streaming_in_many_small_slabs_gives_the_same_result(
    tmp_path: Path, arrays, monkeypatch
) -> None:
    arrays = {**arrays, "layers/scalar": np.array(0.5, np.float32)}
    results = []
    for slab_bytes in (64, 2**30):  # 64 bytes: 8 float64 values, rows cut within
        monkeypatch.setattr(slab, "SLAB_BYTES", slab_bytes)
        folder = tmp_path / str(slab_bytes)
        folder.mkdir()
        checkpoint = write_h5(folder / "fl_checkpoint", arrays)
        parts = [contribution(folder, f"s{i}", updates_like(arrays, i), i + 2) for i in (1, 2)]
        aggregate(checkpoint, parts, folder / "tmp")
        results.append(read_floats(checkpoint))
    assert len(list(slab.slabs((5, 4)))) == 1
    monkeypatch.setattr(slab, "SLAB_BYTES", 64)
    assert list(slab.slabs((5, 4))) == [(slice(i, i + 2),) for i in (0, 2)] + [(slice(4, 5),)]
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name], err_msg=name)


def test_result_too_large_for_the_dtype_is_refused(tmp_path: Path, arrays) -> None:
    """Finite inputs whose average overflows float32 must not become Inf in the checkpoint."""
    arrays["layers/dense/vars/0"][0, 0] = 3e38
    checkpoint = write_h5(tmp_path / "fl_checkpoint", arrays)
    before = digest(checkpoint)
    updates = updates_like(arrays, 3)
    updates["layers/dense/vars/0"][0, 0] = 3e38
    big = contribution(tmp_path, "big", updates, 1)
    with pytest.raises(AggregationError, match=r"'layers/dense/vars/0'.*overflow"):
        aggregate(checkpoint, [big], tmp_path / "tmp")
    assert digest(checkpoint) == before


@needs_fuse
@pytest.mark.fuse
def test_an_input_whose_file_system_says_too_many_open_files_is_refused_alone(
    tmp_path: Path, arrays
) -> None:
    """The selector's folder is its own file system (FUSE), whose server answers EMFILE
    when the aggregation opens its file again (after its check), while the coordinator
    has descriptors to spare: that selector is refused, the others can be averaged
    again. Before, the pass failed as the coordinator's ("ran out of its own
    resources while averaging"): one selector failed the round for everyone."""
    checkpoint = write_h5(tmp_path / "fl_checkpoint", arrays)
    before = digest(checkpoint)
    good = contribution(tmp_path, "good", updates_like(arrays, 1), 2)
    contribution(tmp_path, "served", updates_like(arrays, 2), 2)  # what "bad" shows
    bad = Contribution("bad", UntrustedFile(tmp_path, "bad/fl_agg_checkpoint"), 2)
    with (
        mounted(tmp_path / "served", tmp_path / "bad", "fl_agg_checkpoint", "open", errno.EMFILE),
        pytest.raises(ContributionsRefused) as raised,
    ):
        aggregate(checkpoint, [good, bad], tmp_path / "tmp")
    assert list(raised.value.reasons) == ["bad"]
    assert (
        "cannot be opened (Too many open files, said its file system"
        in (raised.value.reasons["bad"])
    )
    assert digest(checkpoint) == before
    assert leftovers(tmp_path / "tmp") == []


@needs_fuse
@pytest.mark.fuse
@pytest.mark.parametrize("code", [errno.EMFILE, errno.EIO])
@pytest.mark.parametrize("operation", ["getattr", "read"])
def test_every_call_an_inputs_file_system_fails_refuses_that_input_alone(
    tmp_path: Path, arrays, operation: str, code: int
) -> None:
    """The same, for each ``stat`` and ``fstat`` the pass makes of the input in turn (the
    lookups, the ``fstat`` after opening, the look at the end for a change), and each
    read: the server answers EMFILE (or EIO: any errno) from the n-th call on,
    n = 1, 2, ... until the pass makes fewer. Each time that input is refused alone, with
    what its file system said, never the pass failed as the coordinator's."""
    checkpoint = write_h5(tmp_path / "fl_checkpoint", arrays)
    before = digest(checkpoint)
    good = contribution(tmp_path, "good", updates_like(arrays, 1), 2)
    contribution(tmp_path, "served", updates_like(arrays, 2), 2)  # what "bad" shows
    bad = Contribution("bad", UntrustedFile(tmp_path, "bad/fl_agg_checkpoint"), 2)
    outcomes: list[str] = []
    with mounted(tmp_path / "served", tmp_path / "bad", "fl_agg_checkpoint", operation, code) as fs:
        while not outcomes or outcomes[-1] != "averaged":
            fs.arm(operation, code, after=len(outcomes) + 1)
            try:
                aggregate(checkpoint, [good, bad], tmp_path / "tmp")
            except ContributionsRefused as refused:
                outcomes.append(f"refused {sorted(refused.reasons)}")
                said = refused.reasons["bad"]
                assert os.strerror(code) in said or "changed" in said, said
            else:
                outcomes.append("averaged")
            if outcomes[-1] != "averaged":
                assert digest(checkpoint) == before
    assert len(outcomes) >= 3  # lookup, open's fstat, end of the pass at least; 3 reads
    assert outcomes == ["refused ['bad']"] * (len(outcomes) - 1) + ["averaged"]
    assert leftovers(tmp_path / "tmp") == []
