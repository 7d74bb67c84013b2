"""Real Keras models of each floating-point dtype, their problem folders and two updates each.

Run as a script, ``python keras_dtypes.py OUT``, with ``JAX_ENABLE_X64=1``: JAX
keeps float64 variables only then (without it a Keras layer with
``dtype="float64"`` holds, and saves, float32). For each dtype, OUT/<dtype>/
gets ``model.keras``, ``problem/`` made by ``fl-coordinator init --model`` (as
``init_problem``) and ``update0.weights.h5``, ``update1.weights.h5``: the same
model's weights file with other values, standing in for selector aggregates.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from fl_coordinator.config import default_settings
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.model import import_keras
from fl_coordinator.storage.problem import init_problem

DTYPES = ("bfloat16", "float16", "float64")


def make(out: Path) -> None:
    keras = import_keras()
    for dtype in DTYPES:
        folder = out / dtype
        folder.mkdir(parents=True)
        keras.utils.set_random_seed(3)
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(6, dtype=dtype, activation="relu", name="hidden"),
                keras.layers.Dense(3, dtype=dtype, name="out"),
            ]
        )
        model.save(folder / "model.keras")
        root = default_settings().replace(fl_root_path=str(folder / "problem"))
        init_problem(Layout.from_settings(root), folder / "model.keras")
        start = model.get_weights()
        for index, factor in enumerate((0.5, -3.0)):
            model.set_weights(
                [(np.asarray(w, np.float64) * factor + index).astype(w.dtype) for w in start]
            )
            model.save_weights(folder / f"update{index}.weights.h5")


if __name__ == "__main__":
    make(Path(sys.argv[1]))
