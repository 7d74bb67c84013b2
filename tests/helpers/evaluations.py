"""``EVALUATE`` functions for the tests, run in the coordinator's evaluation worker process.

``by_round`` measures what it was given: the round, and the mean of the
checkpoint's weights (so a test can tell which checkpoint it was).
``gated`` measures like it once the test lets it. The others misbehave in
one way each on round 1, and measure like ``by_round`` otherwise.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np

__all__ = [
    "by_round",
    "exits",
    "gated",
    "hangs",
    "killed",
    "not_a_dict",
    "raises",
    "weights_mean",
    "where",
]


def by_round(checkpoint: Path, model: Path, round: int) -> dict[str, float]:
    assert checkpoint.name.endswith(".weights.h5") and model.name == "model.h5"
    return {"accuracy": round / 10, "weights_mean": weights_mean(checkpoint)}


def weights_mean(checkpoint: Path) -> float:
    """The mean of every float value of a weights file (tells one checkpoint from another)."""
    total, count = 0.0, 0
    with h5py.File(checkpoint, "r") as file:
        for name in sorted(_datasets(file)):
            values = np.asarray(file[name])
            if values.dtype.kind == "f":
                total, count = total + float(values.sum(dtype=np.float64)), count + values.size
    return total / count


def _datasets(file: h5py.File) -> list[str]:
    names: list[str] = []
    file.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def gated(checkpoint: Path, model: Path, round: int) -> dict[str, float]:
    """``by_round`` once the test writes a byte to the FIFO ``gate`` beside the model (the
    test holds it open for reading and writing, so this open does not wait)."""
    with open(model.parent / "gate", "rb") as gate:
        gate.read(1)
    return by_round(checkpoint, model, round)


def raises(checkpoint: Path, model: Path, round: int) -> dict[str, float]:
    if round == 1:
        raise ValueError("the test set is missing")
    return by_round(checkpoint, model, round)


def hangs(checkpoint: Path, model: Path, round: int) -> dict[str, float]:
    if round == 1:
        time.sleep(3600)
    return by_round(checkpoint, model, round)


def exits(checkpoint: Path, model: Path, round: int) -> dict[str, float]:
    if round == 1:
        os._exit(3)
    return by_round(checkpoint, model, round)


def killed(checkpoint: Path, model: Path, round: int) -> dict[str, float]:
    if round == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return by_round(checkpoint, model, round)


def not_a_dict(checkpoint: Path, model: Path, round: int) -> object:
    if round == 1:
        return [0.5]
    return {**by_round(checkpoint, model, round), "bad name": 1.0, "nan": float("nan")}


def where(checkpoint: Path, model: Path, round: int) -> dict[str, float]:
    """The process it runs in, and whether Keras is loaded there (it loads it)."""
    import sys

    import keras  # noqa: F401  (what a real evaluation does)

    return {"pid": float(os.getpid()), "keras_loaded": float("keras" in sys.modules)}
