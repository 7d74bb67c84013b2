"""Atomic replacement of files: a reader sees the old file or the new one, never half of one.

Every file the coordinator publishes (the global checkpoint, the journal)
is written to a temporary file on the same file system, flushed to disk,
renamed over the old one, and the folder flushed, so that a crash at any
instant leaves either the old file or the new one, whole.

The new file gets the mode of the file it replaces, or the umask's default
for a new file (0644 under the usual umask 022), as Keras and the Go
coordinator leave theirs: selectors, the webserver or a Go selector running
as other users on the shared volume read it as they read the old one.
(``mkstemp`` alone would leave 0600, readable by its owner only.)

A file that must not replace an existing one (the ownership lease) is
published the same way, by ``link(2)`` instead of ``rename(2)``: it appears
whole or not at all, and only where nothing was (``exclusive``).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_target", "fsync_dir", "write_atomic"]


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it.

    ``os.umask`` can only read by setting: another thread creating a file in
    between would get the wrong mode. Linux shows it in /proc/self/status.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _published_mode(dest: Path) -> int:
    """The permission bits of ``dest``, or the umask's default for a new file."""
    try:
        return stat.S_IMODE(os.stat(dest).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


#: How often a large file being written is flushed in the background.
_FLUSH_EVERY = 0.05


@contextlib.contextmanager
def _flushing(path: Path) -> Iterator[None]:
    """Flush ``path`` to disk every _FLUSH_EVERY seconds, in a thread, while the body runs.

    The disk then writes the file while it is still being computed, and the
    final fsync has only the tail left: for a 1 GB checkpoint that fsync was
    a sixth of the aggregation (bench, 1000x2).
    """
    done = threading.Event()
    fd = os.open(path, os.O_RDONLY)

    def flush() -> None:
        while not done.wait(_FLUSH_EVERY):
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


def _link_new(tmp: Path, dest: Path) -> None:
    """Give ``tmp`` the name ``dest`` unless ``dest`` exists (FileExistsError).

    ``link(2)`` is atomic on NFS too; but a retransmitted LINK whose first
    reply was lost answers EEXIST though the first one made the link: then
    ``tmp``'s link count is 2, and the link is ours (open(2)'s Linux manual
    page, on O_EXCL and NFS).
    """
    try:
        os.link(tmp, dest)
    except FileExistsError:
        if os.stat(tmp).st_nlink != 2:
            raise


@contextlib.contextmanager
def atomic_target(
    dest: Path, tmp_dir: Path, *, large: bool = False, exclusive: bool = False
) -> Iterator[Path]:
    """Yield a temporary path; on success it atomically replaces ``dest``.

    The temporary file lives in ``tmp_dir``, which must be on the same file
    system as ``dest`` (rename is only atomic within one). It is flushed to
    disk before the rename, and the folder after it, so after a crash ``dest``
    is either the old file or the new one, whole. On error the temporary file
    is removed and ``dest`` is untouched. ``large``: the file is flushed in the
    background while it is written (worth a thread only for big files). The
    new file keeps ``dest``'s mode (see the module's docstring).
    ``exclusive``: ``dest`` is only created, never replaced: FileExistsError if
    it exists (a failed write, ENOSPC or EIO or a short one, leaves no ``dest``).
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=tmp_dir)
    os.close(fd)
    tmp = Path(name)
    try:
        with _flushing(tmp) if large else contextlib.nullcontext():
            yield tmp
        with open(tmp, "rb+") as written:
            os.fchmod(written.fileno(), _published_mode(dest))
            os.fsync(written.fileno())
        if exclusive:
            _link_new(tmp, dest)
        else:
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(dest: Path, data: bytes, tmp_dir: Path, *, exclusive: bool = False) -> None:
    """Replace ``dest`` with ``data`` atomically (see :func:`atomic_target`); ``exclusive``:
    create it only, FileExistsError if it exists."""
    with atomic_target(dest, tmp_dir, exclusive=exclusive) as tmp:
        tmp.write_bytes(data)
