"""Preparing (``init``) and checking a problem folder before serving.

``init`` writes ``initFiles/model.h5`` and ``initFiles/fl_checkpoint`` (the
model's weights in Keras 3's HDF5 weights format). It is atomic: both files
are written and checked in a staging folder under ``.coordinator/tmp/``, then
the folder becomes ``initFiles/`` by one rename (or, when ``initFiles/``
already exists, one exchange of the two folders), so a ``serve`` killed during
its first start leaves all of ``initFiles/`` or none of it, never a half that
makes the next start refuse. ``check_problem`` is what ``serve`` runs first: a
missing, unreadable or refused file is a one-line start-up error that names
it, not a traceback halfway through a round.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py

from ..errors import CheckpointError, ConfigError, ProblemError, os_error_text
from .atomic import fsync_dir
from .checkpoint import read_checkpoint_plan
from .layout import Layout
from .swap import NotSupported, exchange
from .weights import Weight

__all__ = ["check_problem", "clean_tmp", "init_problem", "needs_init", "open_root"]

log = logging.getLogger(__name__)


def _save_with_keras(save: Callable[[Path], Any], suffix: str, dest: Path) -> None:
    """Write ``dest`` with a Keras ``save``, which insists on a file suffix, and flush it.

    Keras 3 writes weights only to paths ending in ``.weights.h5`` and legacy
    models only to ``.h5``; the shared names have no suffix, so we save under
    a suffixed name and rename.
    """
    named = dest.with_name(dest.name + suffix)
    try:
        save(named)
        os.replace(named, dest)
    finally:
        named.unlink(missing_ok=True)


def _flush_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``, so a rename of it publishes whole files."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as file:
                os.fsync(file.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def _stage(layout: Layout, model_file: Path | None, staging: Path) -> None:
    """Write model and checkpoint into ``staging`` (initFiles' relative paths), checked."""
    from .model import builtin_model, import_keras, save_legacy_model

    model_path = staging / layout.model.relative_to(layout.init_files)
    checkpoint_path = staging / layout.checkpoint.relative_to(layout.init_files)
    for path in (model_path, checkpoint_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    if model_file is None:
        model = builtin_model()
        save_legacy_model(model, model_path)
    else:
        keras = import_keras()
        try:
            model = keras.models.load_model(model_file, compile=False)
        except Exception as error:
            raise ProblemError(
                f"{model_file}: not a Keras model Keras can load ({error})"
            ) from None
        if model_file.suffix == ".h5":
            shutil.copyfile(model_file, model_path)
        else:
            save_legacy_model(model, model_path)
    # An uncompiled model's weights file has no optimizer state to refuse below.
    _save_with_keras(model.save_weights, ".weights.h5", checkpoint_path)
    try:
        read_checkpoint_plan(checkpoint_path)
    except CheckpointError as error:
        raise ProblemError(f"cannot serve this model: {error}") from None


def init_problem(layout: Layout, model_file: Path | None = None, force: bool = False) -> None:
    """Write the model and its weights as the initial global checkpoint of ``layout``.

    All of ``initFiles/`` or nothing: see the module's docstring. Raises
    ProblemError (the model cannot be loaded or served, or a checkpoint exists
    and ``force`` is not set).
    """
    if layout.checkpoint.exists() and not force:
        raise ProblemError(
            f"{layout.checkpoint} already exists; use --force to replace it "
            "(this discards the trained global model)"
        )
    from .model import import_keras

    import_keras()  # first: without Keras (the slim image) nothing is written
    # mkdir, not mkdtemp: the folder becomes initFiles/, which selectors of other
    # users read, so it gets the usual permissions (umask), not mkdtemp's 0700.
    staging = layout.tmp / f"init-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir(parents=True)
        _stage(layout, model_file, staging)
        _flush_tree(staging)
        layout.init_files.parent.mkdir(parents=True, exist_ok=True)
        if layout.init_files.exists():
            _replace(layout, staging)
        else:
            os.rename(staging, layout.init_files)
        fsync_dir(layout.init_files.parent)
    except PermissionError as error:
        raise ProblemError(
            f"{layout.root}: cannot create {error.filename} (permission denied): the problem "
            f"folder must be writable by this user (uid {os.getuid()}); on Kubernetes, give "
            "the pod an fsGroup or hand the volume to that uid"
        ) from None
    except OSError as error:
        raise ProblemError(
            f"cannot write {layout.init_files} ({os_error_text(error)}); nothing was changed"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange: the old initFiles
    log.info("initialised %s: %s and %s", layout.root, layout.model.name, layout.checkpoint.name)


def _replace(layout: Layout, staging: Path) -> None:
    """Make ``staging`` the existing ``initFiles/``: one exchange where the file system can."""
    _carry_over(layout, staging)
    try:
        exchange(staging, layout.init_files)
    except NotSupported as error:
        # NFS: each file is still replaced whole, the checkpoint last; an init
        # interrupted between the two leaves a new model with the old checkpoint.
        log.warning(
            "%s cannot be swapped atomically here (%s): replacing its files one by one; "
            "if this init is interrupted, run it again",
            layout.init_files,
            error.strerror,
        )
        for dest in (layout.model, layout.checkpoint):
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / dest.relative_to(layout.init_files), dest)


def _carry_over(layout: Layout, staging: Path) -> None:
    """Hard-link into ``staging`` every other file of the existing ``initFiles/``.

    Existing selectors send every file of ``initFiles/`` to clients; files an
    operator put there besides the model and the checkpoint stay.
    """
    written = {layout.model, layout.checkpoint}
    for path in layout.init_files.rglob("*"):
        target = staging / path.relative_to(layout.init_files)
        if path in written or target.exists():
            continue
        if path.is_dir() and not path.is_symlink():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target, follow_symlinks=False)


def needs_init(layout: Layout) -> bool:
    """A folder with no ``initFiles/`` at all is new; anything else must be complete."""
    return not layout.init_files.exists()


def open_root(layout: Layout, init_if_empty: bool = False) -> None:
    """Refuse a problem folder ``serve`` cannot use as it is; initialise a new one only if asked.

    A root that does not exist (a typo, an NFS mount that is not there) or has
    no ``initFiles/`` is not started fresh behind the operator's back: that
    would train a built-in model nobody asked for. With ``init_if_empty``
    (``serve --init-if-empty``; the demo initialises its own folder) such a
    folder is initialised with the built-in model, as ``init`` would. Raises
    ConfigError (one line, exit status 2) for a root that is missing, not a
    folder, or that this user cannot read and write; ProblemError if it
    cannot be initialised.
    """
    root = layout.root
    key = "FL_ROOT_PATH"
    user = f"this user (uid {os.getuid()})"
    try:
        exists = root.exists()
        if exists and not root.is_dir():
            raise ConfigError(key, str(root), "a folder (it is a file)")
        if exists:
            _check_access(root)
        if exists and not needs_init(layout):
            return
    except OSError as error:  # a folder on the way cannot be looked into
        raise ConfigError(
            key, str(root), f"a folder {user} can read ({os_error_text(error)})"
        ) from None
    if not init_if_empty:
        where = (
            f"it has no {layout.init_files.name}/"
            if exists
            else "there is no such folder: a typo, or a mount that is not there?"
        )
        raise ConfigError(
            key,
            str(root),
            f"an initialised problem folder ({where}); run `fl-coordinator init --root {root}` "
            "once, or serve with --init-if-empty to initialise it with the built-in model",
        )
    log.info("%s has no %s/: initialising it with the built-in model", root, layout.init_files.name)
    init_problem(layout)


def _check_access(root: Path) -> None:
    """ConfigError unless this user can read and write the folder ``root``, saying why not:
    a read-only mount (EROFS: no permission would help), or the permissions."""
    if os.access(root, os.R_OK | os.W_OK | os.X_OK):
        return
    user = f"this user (uid {os.getuid()})"
    if os.access(root, os.R_OK | os.X_OK) and os.statvfs(root).f_flag & os.ST_RDONLY:
        raise ConfigError(
            "FL_ROOT_PATH",
            str(root),
            "a folder on a writable file system (it is on a read-only mount: mount it "
            "read-write; on Kubernetes, the volume without readOnly)",
        )
    raise ConfigError("FL_ROOT_PATH", str(root), f"a folder {user} can read and write")


def _hint(layout: Layout, path: Path) -> str:
    """How an operator gets ``path`` (the checkpoint or the model) back, with what the
    commands really do: rollback restores only the checkpoint; init rewrites both."""
    if path == layout.checkpoint:
        return (
            "`fl-coordinator rollback` lists the kept checkpoints and `rollback --round N` "
            "restores one; or start over from the model's initial weights with "
            f"`fl-coordinator init --force --model {layout.model}`"
        )
    return (
        "copy back the model it was initialised with (the file given to `init --model`; the "
        "built-in one: `fl-coordinator init --root SCRATCH` writes it to "
        f"SCRATCH/{layout.model.relative_to(layout.root)}); `init --force` here would also "
        "replace the trained checkpoint, and rollback restores only the checkpoint"
    )


def _check_hdf5(layout: Layout, path: Path, key: str, what: str) -> None:
    hint = _hint(layout, path)
    if not path.is_file():
        raise ConfigError(key, str(path), f"{what} (file is missing: {hint})")
    try:
        with h5py.File(path, "r"):
            pass
    except BlockingIOError as error:
        raise ConfigError(
            key, str(path), f"{what} that no other process holds open for writing ({error})"
        ) from None
    except OSError as error:
        raise ConfigError(key, str(path), f"{what} (unreadable: {error}; {hint})") from None


def check_problem(layout: Layout) -> tuple[Weight, ...]:
    """Raise an OperatorError unless ``layout`` can be served; return the checkpoint's plan.

    The plan (its weight arrays: :func:`.weights.read_plan`) is what every
    selector's contribution is checked against.
    """
    root = layout.root
    if not root.is_dir():
        raise ConfigError("FL_ROOT_PATH", str(root), "a readable and writable folder")
    _check_access(root)
    if not layout.init_files.is_dir():
        raise ConfigError("INIT_FILES_PATH", str(layout.init_files), "a folder")
    _check_hdf5(layout, layout.checkpoint, "CHECKPOINT_FILE", "an HDF5 weights file")
    _check_hdf5(layout, layout.model, "MODEL_FILE", "a Keras model in HDF5 format")
    try:
        plan = read_checkpoint_plan(layout.checkpoint)
    except CheckpointError as error:
        raise ProblemError(str(error)) from None
    return plan


def clean_tmp(layout: Layout) -> None:
    """Remove what a crash may have left in the coordinator's folder (files, staging folders)."""
    if layout.tmp.is_dir():
        for leftover in layout.tmp.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
