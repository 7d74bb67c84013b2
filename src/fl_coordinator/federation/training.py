"""Keras work of a client (and of the demo's evaluation): load, train, make the update.

The shared checkpoint is a Keras 3 weights file without the ``.weights.h5``
suffix Keras insists on, so it is read through a suffixed symlink.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..storage.aggregation import sum_into
from ..storage.contribution import update_norm
from ..storage.model import import_keras
from ..storage.untrusted import UntrustedFile
from ..storage.weights import read_plan, upload_encoding

__all__ = [
    "Hyper",
    "Trainer",
    "batches",
    "clip_update",
    "compile_for_training",
    "load_weights",
    "save_weights",
    "write_update",
]


@dataclass(frozen=True)
class Hyper:
    """Local training: epochs per round, batch size, SGD learning rate and momentum.

    The defaults were chosen by a sweep over optimizers (SGD with and without
    momentum, Adam), learning rates, epochs and batch sizes on the demo's
    non-IID digits split: SGD with momentum reached 0.95-0.96 test accuracy
    in 10 rounds, about 98% of centralized training, over six seeds.
    """

    epochs: int = 2
    batch_size: int = 16
    learning_rate: float = 0.05
    momentum: float = 0.9


def compile_for_training(model: Any, hyper: Hyper) -> None:
    keras = import_keras()
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=hyper.learning_rate, momentum=hyper.momentum),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def load_weights(model: Any, checkpoint: Path) -> None:
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        # A compiled model warns that the file has no optimizer state: it never does.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        named = Path(folder) / "checkpoint.weights.h5"
        named.symlink_to(checkpoint.resolve())
        model.load_weights(named)


def save_weights(model: Any, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:
        named = Path(folder) / "weights.weights.h5"
        model.save_weights(named)
        dest.write_bytes(named.read_bytes())


def batches(samples: int, hyper: Hyper) -> int:
    """n: the number of training batches a client runs in one round (its FedAvg weight)."""
    return math.ceil(samples / hyper.batch_size) * hyper.epochs


class Trainer:
    """One client's model, kept compiled across rounds (recompiling costs seconds per round)."""

    def __init__(self, hyper: Hyper) -> None:
        self.hyper = hyper
        self._model: Any = None
        self._model_digest = b""

    def _model_for(self, model_file: Path) -> Any:
        digest = hashlib.sha256(model_file.read_bytes()).digest()
        if self._model is None or digest != self._model_digest:
            keras = import_keras()
            self._model = keras.models.load_model(model_file, compile=False)
            compile_for_training(self._model, self.hyper)
            self._model_digest = digest
        return self._model

    def data_problem(self, model_file: Path, x: np.ndarray, y: np.ndarray) -> str | None:
        """Why ``x`` and ``y`` cannot train the model of ``model_file`` (None: they can).

        ``x`` must have the model's input shape after the sample axis; the
        labels, ``0 <= y < classes`` for the model's output (sparse
        categorical cross-entropy), unless its output has one unit.
        """
        model = self._model_for(model_file)
        wanted, have = tuple(model.input_shape[1:]), x.shape[1:]
        fits = len(wanted) == len(have) and all(
            w in (None, h) for w, h in zip(wanted, have, strict=True)
        )
        if not fits:
            shape = ", ".join("any" if size is None else str(size) for size in wanted)
            return f"samples of shape ({shape}) in x, as the model takes (x: {have})"
        classes = model.output_shape[-1]
        if classes and classes > 1 and (y.min() < 0 or y.max() >= classes):
            return f"labels 0 to {classes - 1} in y (y: {y.min()} to {y.max()})"
        return None

    def train(
        self,
        model_file: Path,
        checkpoint: Path,
        x: np.ndarray,
        y: np.ndarray,
        dest: Path,
        clip_norm: float = 0.0,
    ) -> int:
        """Train from the global weights; write ``n * (w_new - w)`` to ``dest``; return n.

        With ``clip_norm`` C > 0 (differential privacy), write ``w_new - w`` clipped to L2
        norm C over all weight arrays instead, and return 1: each client counts once.
        """
        model = self._model_for(model_file)
        load_weights(model, checkpoint)
        model.fit(
            x,
            y,
            epochs=self.hyper.epochs,
            batch_size=self.hyper.batch_size,
            verbose=0,
            shuffle=True,
        )
        n = 1 if clip_norm else batches(len(x), self.hyper)
        with tempfile.TemporaryDirectory() as folder:
            trained = Path(folder) / "trained"
            save_weights(model, trained)
            write_update(checkpoint, trained, n, dest)
        if clip_norm:
            clip_update(dest, clip_norm)
        return n


def clip_update(update: Path, clip_norm: float) -> float:
    """Scale the update file ``update`` (ours) in place to L2 norm <= ``clip_norm`` over all
    its weight arrays; return its norm before (McMahan et al. 2018's per-client clip:
    ``delta * min(1, C / ||delta||)``)."""
    with h5py.File(update, "r") as file:
        plan = read_plan(file, update)
    norm = update_norm(UntrustedFile.at(update), plan, "update")
    if norm > clip_norm:
        factor = clip_norm / norm
        with h5py.File(update, "r+") as file:
            for weight in plan:
                dataset = file[weight.name]
                dataset[...] = np.asarray(dataset[()]) * factor
    return norm


def write_update(checkpoint: Path, trained: Path, n: int, dest: Path) -> None:
    """Write the update ``n * (trained - checkpoint)`` to ``dest``, in the checkpoint's layout.

    Computed file to file with the coordinator's own HDF5 walk, so it has
    exactly the checkpoint's layout, whatever Keras adds to its own weights
    files (a compiled model also saves optimizer state). Weights narrower than
    float32 (float16, bfloat16) are uploaded as float32
    (:func:`.weights.upload_encoding`, which the coordinator accepts): with
    n = 40000 batches, a float16 weight that moved by 2 needs n * delta =
    80000, beyond float16's largest value, 65504.
    """

    def update(new: np.ndarray, start: np.ndarray, out: np.ndarray) -> None:
        new -= start
        np.multiply(new, n, out=out, casting="same_kind")

    # Its temporary file is renamed over ``dest``: same folder, same file system.
    with tempfile.TemporaryDirectory(dir=dest.parent) as folder:
        sum_into(
            checkpoint,
            [UntrustedFile.at(trained)],
            dest,
            Path(folder),
            update,
            encode=upload_encoding,
        )
