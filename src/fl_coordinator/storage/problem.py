"""Preparing (``init``) and checking a problem folder before serving.

``init`` writes ``initFiles/model.h5`` and ``initFiles/fl_checkpoint`` (the
model's weights in Keras 3's HDF5 weights format). ``check_problem`` is what
``serve`` runs first: a missing or unreadable file is a one-line start-up
error that names the key, not a traceback halfway through a round.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py

from ..errors import ConfigError, ProblemError
from .aggregation import float_datasets
from .atomic import atomic_target
from .layout import Layout

__all__ = ["check_problem", "clean_tmp", "init_problem", "needs_init"]

log = logging.getLogger(__name__)


def _save_with_keras(save: Callable[[Path], Any], suffix: str, dest: Path, tmp_dir: Path) -> None:
    """Atomically write ``dest`` with a Keras ``save``, which insists on a file suffix.

    Keras 3 writes weights only to paths ending in ``.weights.h5`` and legacy
    models only to ``.h5``; the shared names have no suffix, so we save under
    a suffixed temporary name and rename.
    """
    with atomic_target(dest, tmp_dir) as tmp:
        named = tmp.with_name(tmp.name + suffix)
        try:
            save(named)
            os.replace(named, tmp)
        finally:
            named.unlink(missing_ok=True)


def init_problem(layout: Layout, model_file: Path | None = None, force: bool = False) -> None:
    """Write the model and its weights as the initial global checkpoint of ``layout``."""
    from .model import builtin_model, import_keras

    if layout.checkpoint.exists() and not force:
        raise ProblemError(
            f"{layout.checkpoint} already exists; use --force to replace it "
            "(this discards the trained global model)"
        )
    keras = import_keras()  # first: without Keras (the slim image) nothing is written
    try:
        layout.init_files.mkdir(parents=True, exist_ok=True)
    except PermissionError as error:
        raise ProblemError(
            f"{layout.root}: cannot create {error.filename} (permission denied): the problem "
            f"folder must be writable by this user (uid {os.getuid()}); on Kubernetes, give "
            "the pod an fsGroup or hand the volume to that uid"
        ) from None
    if model_file is None:
        model = builtin_model()
        _save_with_keras(model.save, ".h5", layout.model, layout.tmp)
    else:
        try:
            model = keras.models.load_model(model_file, compile=False)
        except Exception as error:
            raise ProblemError(
                f"{model_file}: not a Keras model Keras can load ({error})"
            ) from None
        if model_file.suffix == ".h5":
            with atomic_target(layout.model, layout.tmp) as tmp:
                shutil.copyfile(model_file, tmp)
        else:
            _save_with_keras(model.save, ".h5", layout.model, layout.tmp)
    _save_with_keras(model.save_weights, ".weights.h5", layout.checkpoint, layout.tmp)
    log.info("initialised %s: %s and %s", layout.root, layout.model.name, layout.checkpoint.name)


def needs_init(layout: Layout) -> bool:
    """A folder with no ``initFiles/`` at all is new; anything else must be complete."""
    return not layout.init_files.exists()


def _check_hdf5(path: Path, key: str, what: str) -> None:
    hint = (
        "run `fl-coordinator init` to create it, or `fl-coordinator rollback` to restore a kept one"
    )

    if not path.is_file():
        raise ConfigError(key, str(path), f"{what} (file is missing: {hint})")
    try:
        with h5py.File(path, "r") as file:
            if key == "CHECKPOINT_FILE" and not float_datasets(file):
                raise ConfigError(key, str(path), f"{what} (it has no float datasets)")
    except OSError as error:
        raise ConfigError(key, str(path), f"{what} (unreadable: {error}; {hint})") from None


def check_problem(layout: Layout) -> None:
    """Raise ConfigError unless ``layout`` can be served."""
    root = layout.root
    if not root.is_dir() or not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError("FL_ROOT_PATH", str(root), "a readable and writable folder")
    if not layout.init_files.is_dir():
        raise ConfigError("INIT_FILES_PATH", str(layout.init_files), "a folder")
    _check_hdf5(layout.checkpoint, "CHECKPOINT_FILE", "an HDF5 weights file")
    _check_hdf5(layout.model, "MODEL_FILE", "a Keras model in HDF5 format")


def clean_tmp(layout: Layout) -> None:
    """Remove temporary files a crash may have left in the coordinator's folder."""
    if layout.tmp.is_dir():
        for leftover in layout.tmp.iterdir():
            if leftover.is_file():
                leftover.unlink()
