"""Keras, on JAX by default, and the built-in model that ``init`` writes.

Keras 3 needs a backend even to import, and it is the slowest import of the
project, so it is imported here only, on demand: the coordinator itself
averages plain HDF5 and never needs it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import h5py
import ml_dtypes
import numpy as np

from ..errors import MissingExtra, ProblemError

__all__ = ["builtin_model", "import_keras", "save_legacy_model"]

log = logging.getLogger(__name__)

#: The built-in classifier: 8x8 digit images (64 features) into 10 classes.
_INPUT_FEATURES = 64
_CLASSES = 10


def import_keras() -> ModuleType:
    """Import Keras with the JAX backend on the CPU unless the user chose otherwise.

    Raises MissingExtra (one line: what to install) where Keras or its backend
    is not installed, as in the slim image.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import keras
    except ImportError as error:
        raise MissingExtra("building or loading a Keras model", "keras", error) from None

    # model.h5 is the legacy HDF5 format on purpose (the Go system's wire
    # contract); Keras warns about that format on every save through absl.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return keras


def builtin_model(seed: int = 0) -> Any:
    """A small dense classifier, enough for ``serve`` to start and for the demo to learn.

    It is not compiled: a compiled model's weights file also carries optimizer
    state (step count, learning rate), which is no part of the global model.
    """
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input(shape=(_INPUT_FEATURES,)),
            keras.layers.Dense(32, activation="relu", name="hidden"),
            keras.layers.Dense(_CLASSES, activation="softmax", name="output"),
        ],
        name="fl_classifier",
    )
    return model


def _bfloat16_as_float32(path: Path) -> int:
    """Rewrite the bfloat16 weights of a legacy HDF5 model file as float32; return how many.

    Keras' legacy HDF5 writer stores bfloat16 arrays as raw 2-byte opaque
    values (``|V2``, no tag), which its own reader then cannot load
    ("Error interpreting argument to stage as a JAX value"). Stored as
    float32 (exact: every bfloat16 is a float32) they load, and Keras casts
    them back into the model's bfloat16 variables. In a file Keras wrote, a
    2-byte opaque dataset can only be bfloat16 (float16 is a native HDF5 type).
    """
    with h5py.File(path, "r+") as file:
        opaque: list[str] = []

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "V" and obj.dtype.itemsize == 2:
                opaque.append(name)

        file.visititems(visit)
        for name in opaque:
            values = file[name][()].view(ml_dtypes.bfloat16).astype(np.float32)
            attributes = dict(file[name].attrs)
            del file[name]
            file.create_dataset(name, data=values).attrs.update(attributes)
    return len(opaque)


def save_legacy_model(model: Any, dest: Path) -> None:
    """``model.save`` in the legacy HDF5 format (``model.h5``), checked by loading it back.

    ``dest`` needs no ``.h5`` suffix. Raises ProblemError if Keras cannot load
    what it wrote, or loads other weights.
    """
    keras = import_keras()
    with tempfile.TemporaryDirectory(dir=dest.parent) as folder:
        named = Path(folder) / "model.h5"
        model.save(named)
        converted = _bfloat16_as_float32(named)
        try:
            loaded = keras.models.load_model(named, compile=False)
            same = all(
                np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True)
            )
        except Exception as error:
            raise ProblemError(
                f"Keras cannot load back the legacy HDF5 model.h5 it wrote for this model "
                f"({type(error).__name__}: {' '.join(str(error).split())[:300]})"
            ) from None
        if not same:
            raise ProblemError("the legacy HDF5 model.h5 Keras wrote loads other weights")
        if converted:
            log.info("model.h5: %d bfloat16 array(s) stored as float32 (see model.py)", converted)
        os.replace(named, dest)
