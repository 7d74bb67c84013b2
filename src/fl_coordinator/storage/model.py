"""Keras, on JAX by default, and the built-in model that ``init`` writes.

Keras 3 needs a backend even to import, and it is the slowest import of the
project, so it is imported here only, on demand: the coordinator itself
averages plain HDF5 and never needs it.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any

from ..errors import MissingExtra

__all__ = ["builtin_model", "import_keras"]

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
