"""The global checkpoint's layout: which datasets are weights, which are kept, which are refused.

Every edge runs through the real coordinator on loopback: a checkpoint it
accepts gets a whole round (fake selectors, real gRPC, real HDF5 files) whose
values are recomputed independently; one it refuses stops ``serve`` before
anything listens, with the file and the reason in one line.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import trio
from helpers.peers import read_floats, run_round, serve_and_watch
from helpers.processes import environment, run

from fl_coordinator.app import serve
from fl_coordinator.config import Settings, default_settings
from fl_coordinator.errors import ProblemError
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.model import builtin_model, import_keras
from fl_coordinator.storage.problem import check_problem, init_problem

BASE = {
    "layers/dense/vars/0": np.linspace(-1, 1, 20, dtype=np.float32).reshape(5, 4),
    "layers/dense/vars/1": np.arange(4, dtype=np.float32),
}


def write_arrays(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as file:
        for name, array in arrays.items():
            file.create_dataset(name, data=array)
    return path


def scaled(arrays: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    return {name: (array * factor).astype(array.dtype) for name, array in arrays.items()}


def expected_average(
    arrays: dict[str, np.ndarray], updates: list[tuple[dict[str, np.ndarray], int]]
) -> dict[str, np.ndarray]:
    """w + (sum of A_s) / (sum of N_s), in float64, cast to each array's dtype."""
    total = sum(weight for _, weight in updates)
    return {
        name: (
            array.astype(np.float64) + sum(u[name].astype(np.float64) for u, _ in updates) / total
        ).astype(array.dtype)
        for name, array in arrays.items()
    }


# -- datasets with nothing to average, scalars, many tiny ones, deep groups ----------

EMPTY = {
    "shape (0,)": lambda file: file.create_dataset("layers/none/vars/0", shape=(0,), dtype="f4"),
    "shape (0, 4)": lambda file: file.create_dataset(
        "layers/none/vars/0", shape=(0, 4), dtype="f8"
    ),
    "null dataspace": lambda file: file.create_dataset("layers/none/vars/0", data=h5py.Empty("f4")),
}


@pytest.mark.parametrize("case", list(EMPTY))
async def test_float_datasets_without_values_are_kept_and_the_rest_averaged(
    settings: Settings, layout: Layout, tmp_path: Path, nursery: trio.Nursery, case: str
) -> None:
    with h5py.File(write_arrays(layout.checkpoint, BASE), "a") as file:
        EMPTY[case](file)
        before = file["layers/none/vars/0"]
        kept = (before.shape, before.dtype)
    updates = [(scaled(BASE, 3.0), 2), (scaled(BASE, -1.0), 6)]
    sources = [(write_arrays(tmp_path / f"a{i}", u), n) for i, (u, n) in enumerate(updates)]
    with h5py.File(sources[0][0], "a") as file:  # one selector copied it along, one did not
        EMPTY[case](file)
    endpoints, watcher, _ = await serve_and_watch(nursery, settings)
    done = await run_round(nursery, endpoints.grpc_port, watcher, layout, sources)
    assert (done["stage"], done["rejected"]) == ("COMPLETED", {})
    after = read_floats(layout.checkpoint)
    assert sorted(after) == sorted(BASE)  # the empty one is no weight array
    for name, value in expected_average(BASE, updates).items():
        np.testing.assert_array_equal(after[name], value)
    with h5py.File(layout.checkpoint, "r") as file:
        assert (file["layers/none/vars/0"].shape, file["layers/none/vars/0"].dtype) == kept


def deep_name(depth: int) -> str:
    return "/".join(f"g{level}" for level in range(depth)) + "/kernel"


LAYOUTS = {
    "scalar": {"layers/scale/vars/0": np.array(0.25, np.float32)},
    "1000 one-value datasets": {
        f"layers/tiny{index}/vars/0": np.array([index / 8], np.float32) for index in range(1000)
    },
    "groups 120 deep": {deep_name(120): np.arange(6, dtype=np.float64).reshape(2, 3)},
}


@pytest.mark.parametrize("case", list(LAYOUTS))
async def test_scalars_many_tiny_datasets_and_deep_groups_are_averaged(
    settings: Settings, layout: Layout, tmp_path: Path, nursery: trio.Nursery, case: str
) -> None:
    arrays = LAYOUTS[case]
    write_arrays(layout.checkpoint, arrays)
    updates = [(scaled(arrays, 2.0), 4), (scaled(arrays, 0.5), 1)]
    sources = [(write_arrays(tmp_path / f"a{i}", u), n) for i, (u, n) in enumerate(updates)]
    endpoints, watcher, _ = await serve_and_watch(nursery, settings)
    done = await run_round(nursery, endpoints.grpc_port, watcher, layout, sources)
    assert (done["stage"], done["rejected"]) == ("COMPLETED", {})
    after = read_floats(layout.checkpoint)
    expected = expected_average(arrays, updates)
    assert after.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


# -- refused at start-up ----------------------------------------------------------------


@pytest.fixture(scope="session")
def keras_refused(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Weights files real Keras writes that FedAvg must not average: one per kind."""
    keras = import_keras()
    folder = tmp_path_factory.mktemp("refused")

    quantized = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")])
    with warnings.catch_warnings():  # "InputLayer does not have a `quantize` method"
        warnings.simplefilter("ignore", UserWarning)
        quantized.quantize("int8")
    quantized.save_weights(folder / "quantized.weights.h5")

    class Float8(keras.layers.Layer):
        def build(self, shape: tuple[int, ...]) -> None:
            self.scale = self.add_weight(
                shape=(3,), dtype="float8_e4m3fn", initializer="ones", trainable=False
            )

        def call(self, x: object) -> object:
            return x

    float8 = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), Float8()])
    float8.save_weights(folder / "float8.weights.h5")

    trained = builtin_model(seed=5)
    trained.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    trained.fit(x, np.arange(16) % 10, epochs=1, verbose=0)
    trained.save_weights(folder / "optimizer.weights.h5")
    trained.save(folder / "trained.keras")
    return {
        name: folder / f"{name}.{'keras' if name == 'trained' else 'weights.h5'}"
        for name in ("quantized", "float8", "optimizer", "trained")
    }


def with_base(extra: Callable[[h5py.File, Path], None]) -> Callable[[Path, dict], None]:
    def write(path: Path, _: dict[str, Path]) -> None:
        with h5py.File(write_arrays(path, BASE), "a") as file:
            extra(file, path.parent)

    return write


def virtual(file: h5py.File, folder: Path) -> None:
    write_arrays(folder / "outside.h5", {"values": np.full(4, 1234.5, np.float32)})
    source = h5py.VirtualSource(folder / "outside.h5", "values", shape=(4,))
    layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
    layout[:] = source
    file.create_virtual_dataset("layers/virtual/vars/0", layout)


def external_storage(file: h5py.File, folder: Path) -> None:
    (folder / "raw.bin").write_bytes(bytes(16))
    file.create_dataset("layers/ext/vars/0", shape=(4,), dtype="f4",
                        external=[(str(folder / "raw.bin"), 0, 16)])  # fmt: skip


def copy_of(name: str) -> Callable[[Path, dict[str, Path]], None]:
    return lambda path, files: path.write_bytes(files[name].read_bytes())


REFUSED = {
    "soft link": (with_base(lambda f, _: f.__setitem__("layers/alias", h5py.SoftLink(
        "/layers/dense/vars/0"))), "'layers/alias' is a soft link"),
    "external link": (with_base(lambda f, _: f.__setitem__("layers/ext", h5py.ExternalLink(
        "other.h5", "/w"))), "'layers/ext' is an external link"),
    "hard link": (with_base(lambda f, _: f.__setitem__("layers/again", f["layers/dense/vars/0"])),
                  "one object under several names"),
    "virtual dataset": (with_base(virtual), "is a virtual dataset"),
    "external storage": (with_base(external_storage), "keeps its values in external files"),
    "floats in a compound": (with_base(lambda f, _: f.create_dataset(
        "layers/pair/vars/0", data=np.zeros(3, [("a", "f4"), ("b", "f4")]))),
        "floats inside a"),
    "opaque tagged as no float": (with_base(lambda f, _: f.create_dataset(
        "layers/q/vars/0", data=np.zeros(3, "V2")).attrs.create("dtype", "int4")),
        "opaque values tagged dtype='int4', not a floating-point type"),
    "quantized (Keras int8)": (copy_of("quantized"), "is an integer array (int8, (4, 3))"),
    "float8 (Keras, untagged)": (copy_of("float8"), "1-byte opaque values with no dtype"),
    "optimizer state (Keras)": (copy_of("optimizer"), "holds optimizer state (optimizer/)"),
    "no weights": (lambda p, _: write_arrays(p, {"step": np.int64(3)}), "has no weight arrays"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
async def test_checkpoints_that_cannot_be_averaged_are_refused_at_start_up(
    settings: Settings, layout: Layout, keras_refused, case: str
) -> None:
    write, reason = REFUSED[case]
    write(layout.checkpoint, keras_refused)
    async with trio.open_nursery() as nursery:
        with pytest.raises(ProblemError) as refused:
            await nursery.start(serve, settings)
    message = str(refused.value)
    assert reason in message and str(layout.checkpoint) in message
    assert "\n" not in message and len(message) < 600


def test_serve_refuses_optimizer_state_in_one_line_that_says_what_to_do(
    layout: Layout, keras_refused
) -> None:
    layout.checkpoint.write_bytes(keras_refused["optimizer"].read_bytes())
    result = run(["serve"], environment(layout.root))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fl-coordinator serve: {layout.checkpoint} holds optimizer state")
    assert "compile=False" in lines[0] and "fl-coordinator init --model" in lines[0]


def test_init_from_a_compiled_trained_model_writes_no_optimizer_state(
    tmp_path: Path, keras_refused
) -> None:
    """``init`` loads the model uncompiled: its checkpoint holds the weights only."""
    settings = default_settings().replace(fl_root_path=str(tmp_path / "problem"))
    layout = Layout.from_settings(settings)
    init_problem(layout, keras_refused["trained"])
    with h5py.File(layout.checkpoint, "r") as file:
        assert sorted(file) == ["layers", "vars"]
    plan = check_problem(layout)
    assert [w.name for w in plan] == [
        "layers/dense/vars/0", "layers/dense/vars/1", "layers/dense_1/vars/0",
        "layers/dense_1/vars/1",
    ]  # fmt: skip
    with h5py.File(keras_refused["optimizer"], "r") as trained:
        np.testing.assert_array_equal(
            read_floats(layout.checkpoint)["layers/dense/vars/0"], trained["layers/dense/vars/0"]
        )


def test_a_checkpoint_whose_groups_cannot_be_read_is_a_checkpoint_error(tmp_path: Path) -> None:
    """A link table pointing past the file's end (one address overwritten): HDF5's raw
    RuntimeError ("Link visitation failed") escaped the plan, at start-up and in every
    aggregation; now a CheckpointError naming the file and what to do."""
    import struct

    from fl_coordinator.errors import CheckpointError
    from fl_coordinator.storage.checkpoint import read_checkpoint_plan

    checkpoint = tmp_path / "fl_checkpoint"
    with h5py.File(checkpoint, "w") as file:
        file["layers/d/vars/0"] = np.ones(32, np.float32)
        address = file["layers/d/vars/0"].id.get_offset()
    data = bytearray(checkpoint.read_bytes())
    at = data.find(struct.pack("<Q", address))  # first: a group's, before the array's layout
    assert 0 < at < address
    data[at : at + 8] = struct.pack("<Q", len(data) - 64)
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as failed:
        read_checkpoint_plan(checkpoint)
    assert str(failed.value).startswith(f"{checkpoint}: its groups cannot be read (")
    assert str(failed.value).endswith(
        "restore it (`fl-coordinator rollback`) or initialise the problem again"
    )


def test_a_checkpoint_that_cannot_be_opened_for_want_of_descriptors_says_so(
    tmp_path: Path,
) -> None:
    """The coordinator out of descriptors (its RLIMIT_NOFILE at its lowest free one) as the
    averaging pass opens the checkpoint: a CheckpointError that says the coordinator is
    out of its own resources. Before: "the checkpoint is not a readable HDF5 file
    ([Errno 24] Too many open files ...)", which sends an operator to a good file."""
    from helpers.resources import out_of_descriptors

    from fl_coordinator.errors import CheckpointError
    from fl_coordinator.storage.checkpoint import read_checkpoint_plan

    checkpoint = tmp_path / "fl_checkpoint"
    with h5py.File(checkpoint, "w") as file:
        file["layers/d/vars/0"] = np.ones(32, np.float32)
    with out_of_descriptors(), pytest.raises(CheckpointError) as failed:
        read_checkpoint_plan(checkpoint)
    assert str(failed.value) == (
        f"{checkpoint}: the checkpoint cannot be opened: the coordinator is out of its own "
        "resources ([Errno 24] Too many open files); raise its RLIMIT_NOFILE or memory"
    )
    assert [weight.name for weight in read_checkpoint_plan(checkpoint)] == ["layers/d/vars/0"]
