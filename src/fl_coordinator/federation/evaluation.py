"""The demo's evaluation, as an ``EVALUATE`` function: the digits test set's accuracy and loss.

Point a coordinator at it with ``EVALUATE=fl_coordinator.federation.evaluation:digits``
(the demo does), or copy it as the pattern of your own: it is called in the
coordinator's evaluation worker process as ``digits(checkpoint_path,
model_path, round)`` and returns plain numbers by name. The test set is the
20% of scikit-learn's ``load_digits`` the demo holds out, drawn with the seed
in the environment variable ``DIGITS_TEST_SEED`` (default 0, the demo's
``--seed``); it needs the ``demo`` extra (Keras, scikit-learn).

The model and the data are loaded once per worker process and kept: a
round's evaluation only loads the new weights and predicts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .data import split_digits
from .training import load_weights

__all__ = ["SEED_VARIABLE", "digits", "scores"]

#: The environment variable that names the seed of the held-out test set.
SEED_VARIABLE = "DIGITS_TEST_SEED"

#: The model (by its file and modification time) and the test set, once loaded.
_loaded: dict[str, Any] = {}


def scores(model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy and mean cross-entropy loss of ``model`` (class probabilities) on ``x``, ``y``."""
    probabilities = np.asarray(model.predict(x, verbose=0, batch_size=512), dtype=np.float64)
    picked = np.clip(probabilities[np.arange(len(y)), y], 1e-12, 1.0)
    return {
        "accuracy": float(np.mean(np.argmax(probabilities, axis=1) == y)),
        "loss": float(-np.mean(np.log(picked))),
    }


def _model(model_path: Path) -> Any:
    key = f"{model_path}:{model_path.stat().st_mtime_ns}"
    if _loaded.get("model_key") != key:
        from ..storage.model import import_keras

        _loaded["model"] = import_keras().models.load_model(model_path, compile=False)
        _loaded["model_key"] = key
    return _loaded["model"]


def _test_set() -> tuple[np.ndarray, np.ndarray]:
    seed = int(os.environ.get(SEED_VARIABLE, "0"))
    if _loaded.get("seed") != seed:
        # The held-out part depends on the seed only (not on the clients' split).
        split = split_digits(clients=1, seed=seed)
        _loaded["test"], _loaded["seed"] = (split.x_test, split.y_test), seed
    return _loaded["test"]


def digits(checkpoint_path: Path, model_path: Path, round: int) -> dict[str, float]:
    """``EVALUATE`` function: accuracy and loss of ``checkpoint_path`` on the digits test set."""
    model = _model(Path(model_path))
    load_weights(model, Path(checkpoint_path))
    return scores(model, *_test_set())
