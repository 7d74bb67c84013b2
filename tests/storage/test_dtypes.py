"""Every floating-point dtype Keras 3 saves is averaged in its own encoding, and Keras loads it.

Real Keras models with ``dtype="bfloat16"``, ``"float16"`` and ``"float64"``
layers (made in a JAX process with x64 on, so float64 stays float64), a
complex64 variable, and a numpy float128 file go through ``init`` and a whole
round on the real coordinator; the new values are recomputed independently
(float64, complex128 or long double sums, cast back to the array's dtype).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np
import pytest
import trio
from helpers.peers import read_floats, run_round, serve_and_watch

from fl_coordinator.config import Settings
from fl_coordinator.federation.training import load_weights
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.model import import_keras

HELPER = Path(__file__).parents[1] / "helpers" / "keras_dtypes.py"
KERAS_DTYPES = ("bfloat16", "float16", "float64")


@pytest.fixture(scope="session")
def keras_dtype_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dtypes")
    env = {**os.environ, "JAX_ENABLE_X64": "1", "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    made = subprocess.run([sys.executable, str(HELPER), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    return out


def averaged(
    start: dict[str, np.ndarray], updates: list[tuple[dict[str, np.ndarray], int]]
) -> dict[str, np.ndarray]:
    """w + (sum of A_s) / (sum of N_s), summed in float64 / complex128 / long double."""
    total = sum(weight for _, weight in updates)
    result = {}
    for name, array in start.items():
        wide = np.result_type(array.dtype if array.dtype.kind in "fc" else np.float32, np.float64)
        sums = sum(update[name].astype(wide) for update, _ in updates)
        result[name] = (array.astype(wide) + sums / total).astype(array.dtype)
    return result


def encodings(path: Path) -> dict[str, tuple[str, object]]:
    """Each dataset's stored dtype and Keras' ``dtype`` attribute (None if absent)."""
    found: dict[str, tuple[str, object]] = {}
    with h5py.File(path, "r") as file:
        file.visititems(
            lambda name, obj: (
                found.__setitem__(name, (str(obj.dtype), obj.attrs.get("dtype")))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return found


def same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal dtype and values (not bytes: an x86 long double has six bytes of padding)."""
    assert actual.dtype == expected.dtype
    assert np.array_equal(actual, expected), (actual, expected)


# This process runs JAX without x64: loading the float64 model says it keeps float32.
@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64:UserWarning")
@pytest.mark.parametrize("dtype", KERAS_DTYPES)
async def test_keras_dtype_model_is_initialised_averaged_and_loaded_by_keras(
    keras_dtype_models: Path, tmp_path: Path, settings: Settings, nursery: trio.Nursery, dtype: str
) -> None:
    made = keras_dtype_models / dtype
    root = tmp_path / "problem"
    shutil.copytree(made / "problem", root)
    settings = settings.replace(fl_root_path=str(root))
    layout = Layout.from_settings(settings)
    keras = import_keras()

    # init wrote a model.h5 that Keras loads back, with the model's own weights
    model = keras.models.load_model(layout.model, compile=False)
    original = keras.models.load_model(made / "model.keras", compile=False)
    assert model.layers[0].kernel.dtype == dtype
    for loaded, kept in zip(model.get_weights(), original.get_weights(), strict=True):
        np.testing.assert_array_equal(loaded.astype(np.float64), kept.astype(np.float64))

    start = read_floats(layout.checkpoint)
    stored = encodings(layout.checkpoint)
    assert {s for s, _ in stored.values()} == {"|V2" if dtype == "bfloat16" else dtype}
    updates = [(made / "update0.weights.h5", 3), (made / "update1.weights.h5", 5)]
    endpoints, watcher, _ = await serve_and_watch(nursery, settings)
    done = await run_round(nursery, endpoints.grpc_port, watcher, layout, updates)
    assert (done["stage"], done["rejected"]) == ("COMPLETED", {})

    after = read_floats(layout.checkpoint)
    expected = averaged(start, [(read_floats(path), n) for path, n in updates])
    assert sorted(after) == sorted(expected) and len(after) == 4
    for name in expected:
        same(after[name], expected[name])
        assert not np.array_equal(after[name], start[name])  # never silently unchanged
    assert encodings(layout.checkpoint) == stored  # bfloat16 keeps its |V2 and its tag

    # Keras loads the new global checkpoint into the model: the clients' next start
    load_weights(model, layout.checkpoint)
    kernel = expected["layers/dense/vars/0"]
    np.testing.assert_array_equal(
        model.get_weights()[0], kernel.astype(model.get_weights()[0].dtype)
    )


async def test_complex_keras_variables_are_averaged_as_complex(
    settings: Settings, layout: Layout, tmp_path: Path, nursery: trio.Nursery
) -> None:
    keras = import_keras()

    class Phase(keras.layers.Layer):
        def build(self, shape: tuple[int, ...]) -> None:
            self.phase = self.add_weight(shape=(4,), dtype="complex64", initializer="zeros")

        def call(self, x: object) -> object:
            return x

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2), Phase()])
    sources = []
    for index, phase in enumerate(([1 + 2j, -1j, 3, 0.5 + 0.5j], [2j, 1, -1 - 1j, 4j], [0] * 4)):
        model.layers[1].phase.assign(np.array(phase, np.complex64))
        path = tmp_path / f"w{index}.weights.h5"
        model.save_weights(path)
        sources.append(path)
    shutil.copyfile(sources[2], layout.checkpoint)
    assert encodings(layout.checkpoint)["layers/phase/vars/0"][0] == "complex64"
    start = read_floats(layout.checkpoint)
    endpoints, watcher, _ = await serve_and_watch(nursery, settings)
    updates = [(sources[0], 2), (sources[1], 6)]
    done = await run_round(nursery, endpoints.grpc_port, watcher, layout, updates)
    assert done["stage"] == "COMPLETED"
    after = read_floats(layout.checkpoint)
    expected = averaged(start, [(read_floats(p), n) for p, n in updates])
    same(after["layers/phase/vars/0"], expected["layers/phase/vars/0"])
    assert after["layers/phase/vars/0"][0] == np.complex64(0.125 + 0.5j)  # 0 + (1+2j + 2j) / 8
    load_weights(model, layout.checkpoint)  # Keras loads it back
    same(np.asarray(model.layers[1].phase.numpy()), expected["layers/phase/vars/0"])


async def test_float128_is_averaged_in_long_double(
    settings: Settings, layout: Layout, tmp_path: Path, nursery: trio.Nursery
) -> None:
    third = np.longdouble(1) / 3  # not representable in float64: the sum must not pass through it
    arrays = {"w": np.array([third, 1 + third], np.longdouble)}
    with h5py.File(layout.checkpoint, "w") as file:
        file["w"] = arrays["w"]
    updates = []
    for index, scale in enumerate((np.longdouble(2) / 7, np.longdouble(-5) / 11)):
        path = tmp_path / f"u{index}"
        with h5py.File(path, "w") as file:
            file["w"] = arrays["w"] * scale
        updates.append((path, 3))
    endpoints, watcher, _ = await serve_and_watch(nursery, settings)
    done = await run_round(nursery, endpoints.grpc_port, watcher, layout, updates)
    assert done["stage"] == "COMPLETED"
    after = read_floats(layout.checkpoint)["w"]
    expected = averaged(arrays, [(read_floats(p), n) for p, n in updates])["w"]
    same(after, expected)
    sums = sum(read_floats(p)["w"].astype(np.float64) for p, _ in updates)
    through_float64 = (arrays["w"].astype(np.float64) + sums / 6).astype(np.longdouble)
    assert not np.array_equal(after, through_float64)  # long double precision was kept


def test_bfloat16_values_decode_through_ml_dtypes(keras_dtype_models: Path) -> None:
    """The |V2 bytes Keras writes are bfloat16 bit patterns: decoded, they are the model's."""
    with h5py.File(
        keras_dtype_models / "bfloat16" / "problem" / "initFiles" / "fl_checkpoint"
    ) as f:
        raw = f["layers/dense/vars/0"][()]
        assert f["layers/dense/vars/0"].attrs["dtype"] == "bfloat16"
    values = raw.view(ml_dtypes.bfloat16)
    keras = import_keras()
    model = keras.models.load_model(keras_dtype_models / "bfloat16" / "model.keras")
    np.testing.assert_array_equal(values, model.get_weights()[0])
