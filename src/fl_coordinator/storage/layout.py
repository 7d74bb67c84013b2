"""The shared-storage layout of one FL problem, selector-id checks and atomic replace.

Existing selectors walk ``initFiles/`` recursively and stream every file they
find to every client, so the coordinator never leaves anything of its own
there: temporary files and history live in ``.coordinator/`` beside it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from ..errors import InvalidSelectorId

#: Longest selector id we accept: an id is a folder name (255 bytes on most
#: file systems) and also a ``host:port`` we dial.
MAX_SELECTOR_ID_BYTES = 255

COORDINATOR_DIR = ".coordinator"


#: C0 controls and DEL. A regex, not a loop over characters: this runs on every
#: check-in (it was a tenth of the coordinator's own cost per check-in).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_selector_id(selector_id: str) -> str:
    """Return ``selector_id`` if it is a safe, single path component; raise otherwise.

    The id names a folder under the root, so it must never reach outside it
    (``..``, separators, absolute paths) or smuggle a NUL into a system call.
    """
    if not selector_id:
        raise InvalidSelectorId("selector id is empty")
    if len(selector_id.encode("utf-8", "surrogatepass")) > MAX_SELECTOR_ID_BYTES:
        raise InvalidSelectorId(
            f"selector id is longer than {MAX_SELECTOR_ID_BYTES} bytes ({len(selector_id)} chars)"
        )
    if "\0" in selector_id:
        raise InvalidSelectorId(f"selector id {selector_id!r} contains a NUL character")
    if "/" in selector_id or "\\" in selector_id:
        raise InvalidSelectorId(f"selector id {selector_id!r} contains a path separator")
    if selector_id in (".", ".."):
        raise InvalidSelectorId(f"selector id {selector_id!r} is not a folder name")
    if _CONTROL.search(selector_id):
        raise InvalidSelectorId(f"selector id {selector_id!r} contains a control character")
    return selector_id


@dataclass(frozen=True)
class Layout:
    """Paths of one problem folder, derived from the settings."""

    root: Path
    init_files: Path
    checkpoint: Path
    model: Path
    agg_checkpoint_name: str
    agg_weight_name: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Layout:
        root = settings.root
        init_files = root / settings.init_files_path.strip("/")
        return cls(
            root=root,
            init_files=init_files,
            checkpoint=init_files / settings.checkpoint_file.strip("/"),
            model=init_files / settings.model_file.strip("/"),
            agg_checkpoint_name=settings.agg_checkpoint_file_path.strip("/"),
            agg_weight_name=settings.agg_checkpoint_weight_path.strip("/"),
        )

    @property
    def own(self) -> Path:
        """The coordinator's private folder (never sent to clients)."""
        return self.root / COORDINATOR_DIR

    @property
    def tmp(self) -> Path:
        return self.own / "tmp"

    def selector_dir(self, selector_id: str) -> Path:
        return self.root / check_selector_id(selector_id)

    def agg_checkpoint(self, selector_id: str) -> Path:
        return self.selector_dir(selector_id) / self.agg_checkpoint_name

    def agg_weight(self, selector_id: str) -> Path:
        return self.selector_dir(selector_id) / self.agg_weight_name


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: How often a large file being written is flushed in the background.
FLUSH_EVERY = 0.05


@contextlib.contextmanager
def _flushing(path: Path) -> Iterator[None]:
    """Flush ``path`` to disk every FLUSH_EVERY seconds, in a thread, while the body runs.

    The disk then writes the file while it is still being computed, and the
    final fsync has only the tail left: for a 1 GB checkpoint that fsync was
    a sixth of the aggregation (bench, 1000x2).
    """
    done = threading.Event()
    fd = os.open(path, os.O_RDONLY)

    def flush() -> None:
        while not done.wait(FLUSH_EVERY):
            try:
                os.fdatasync(fd)
            except OSError:
                return  # e.g. ENOSPC: the final fsync, in the writer's thread, reports it

    flusher = threading.Thread(target=flush, name=f"flush {path.name}", daemon=True)
    flusher.start()
    try:
        yield
    finally:
        done.set()
        flusher.join()
        os.close(fd)


@contextlib.contextmanager
def atomic_target(dest: Path, tmp_dir: Path, *, large: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success it atomically replaces ``dest``.

    The temporary file lives in ``tmp_dir``, which must be on the same file
    system as ``dest`` (rename is only atomic within one). It is flushed to
    disk before the rename, and the folder after it, so after a crash ``dest``
    is either the old file or the new one, whole. On error the temporary file
    is removed and ``dest`` is untouched. ``large``: the file is flushed in the
    background while it is written (worth a thread only for big files).
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=tmp_dir)
    os.close(fd)
    tmp = Path(name)
    try:
        with _flushing(tmp) if large else contextlib.nullcontext():
            yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(dest: Path, data: bytes, tmp_dir: Path) -> None:
    """Replace ``dest`` with ``data`` atomically (see :func:`atomic_target`)."""
    with atomic_target(dest, tmp_dir) as tmp:
        tmp.write_bytes(data)


def os_error_text(error: OSError) -> str:
    """``error`` in one short line: ``[Errno 28] No space left on device``.

    HDF5's messages carry the same errno inside a paragraph of C details
    (buffer addresses, offsets); the errno is what an operator acts on.
    """
    if error.errno:
        return f"[Errno {error.errno}] {os.strerror(error.errno)}"
    return " ".join(str(error).split())[:300]
