"""HDF5 files read and written through descriptors of ours, never opened by HDF5 itself.

h5py calls HDF5 holding the GIL (and its own global lock, ``phil``). Where
HDF5's own drivers (sec2, the default) make the ``open``, ``pread`` or
``pwrite``, a system call the kernel keeps waiting (a hung NFS mount under
FL_ROOT_PATH, another process's lease) stops the *whole* process for as long:
the event loop, health checks, status, check-ins. Here the file is opened with
``os.open`` and HDF5 reaches it through h5py's ``fileobj`` driver: each of its
reads and writes is then a call of a Python file object, which releases the
GIL in the kernel, so a stuck call stops only the thread that made it.

The file object is unbuffered (each call of HDF5 is one system call, at once,
as with sec2), so HDF5's writes and the values other descriptors ``pwrite``
into the same file (:mod:`.plain`) land in the order they are made, and
everything is in the file when h5py's ``close`` returns. It reads and writes
whole: h5py's driver ignores a short count, which sec2 would have completed,
and it fills what lies past the end of the file with zeros, as sec2 does.

The coordinator's own files (the global checkpoint, the new one, the
optimizer's state) are opened by :func:`open_own`, with the lock HDF5 would
have taken; a selector's files by :mod:`.untrusted`, which then calls
:func:`hdf5_on`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py

__all__ = ["OwnFile", "hdf5_on", "open_own"]

#: errno values of a ``flock`` that say the file system has no locks: HDF5 then goes on
#: without one (its default, "ignore when disabled"), and so do we.
_NO_LOCKS = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP})


class _WholeIO(io.FileIO):
    """An unbuffered file object on a descriptor whose reads and writes are whole.

    While ``closing``, a failed write (or trim) is only kept in ``failed`` (the first),
    as if it had been made: a close that fails in HDF5 leaves the file open in the
    library (a DatasetID and a FileID on a descriptor we then close, whose number is
    soon another file's; the process then crashed in HDF5, at once or at exit), and
    h5py raised it as an AttributeError about ``truncate``. :func:`open_own` raises it
    once HDF5 has let go of the file.
    """

    failed: OSError | None = None
    closing = False

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            got = super().readinto(view[done:])
            if not got:  # past the end of the file: zeros, as HDF5's sec2 driver reads
                view[done:] = bytes(len(view) - done)
                break
            done += got
        return len(view)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        """As FileIO's, but an offset no file offset holds (a header may name any 64-bit
        address) raises OSError (EOVERFLOW), as a read there fails, not OverflowError."""
        try:
            return super().seek(pos, whence)
        except OverflowError:
            raise OSError(errno.EOVERFLOW, os.strerror(errno.EOVERFLOW)) from None

    def write(self, data: Any) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        with self._kept_while_closing():
            done = 0
            while done < len(view):
                written = super().write(view[done:])
                if not written:  # never for a regular file; no endless loop if it were
                    raise OSError(errno.EIO, f"wrote {done} of {len(view)} bytes")
                done += written
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        with self._kept_while_closing():
            return super().truncate(size)
        return size or 0

    @contextlib.contextmanager
    def _kept_while_closing(self) -> Iterator[None]:
        """An OSError raised inside: raised, or while ``closing`` kept in ``failed`` (the
        first) as if the call had been made.

        Kept without its traceback: the traceback's frames hold this object, which
        HDF5 holds too (from C, where the garbage collector cannot see it) while the
        file is open; a failed open, whose file HDF5 never closes, would then keep
        both until HDF5's own exit handler freed them after Python's end (SIGSEGV).
        """
        try:
            yield
        except OSError as error:
            if not self.closing:
                raise
            self.failed = self.failed or error.with_traceback(None)


def hdf5_on(fd: int, mode: Literal["r", "r+", "w"], **options: Any) -> h5py.File:
    """The HDF5 file open on descriptor ``fd`` (``mode`` and ``options`` as for
    :class:`h5py.File`; ``"w"``: ``fd`` is an empty file, open for reading and writing).

    The caller keeps ``fd`` open until the h5py file is closed, and closes it.
    """
    return h5py.File(_raw(fd, mode), mode, **options)


def _raw(fd: int, mode: Literal["r", "r+", "w"]) -> _WholeIO:
    return _WholeIO(fd, "r" if mode == "r" else "r+", closefd=False)


def _locking() -> bool:
    """Whether HDF5 would lock the file (``HDF5_USE_FILE_LOCKING``, as HDF5 reads it)."""
    # Case and all: HDF5 locks on "false" (a value it does not know).
    return os.environ.get("HDF5_USE_FILE_LOCKING") not in ("FALSE", "0")


def _lock(fd: int, exclusive: bool) -> None:
    """The lock HDF5 takes on a file it opens: shared to read, exclusive to write, never
    waited for. Raises BlockingIOError (errno 11) while another process holds one that
    excludes it, as h5py does."""
    if not _locking():
        return
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in _NO_LOCKS:
            raise


@dataclass(frozen=True)
class OwnFile:
    """One of the coordinator's own HDF5 files, open: ``file``, and ``fd``, the descriptor
    it is read and written through (for ``preadv``/``fstat`` beside h5py)."""

    file: h5py.File
    fd: int


@contextlib.contextmanager
def open_own(path: Path, mode: Literal["r", "w"]) -> Iterator[OwnFile]:
    """``path`` open as HDF5 (``"r"``: read-only; ``"w"``: created or emptied), through a
    descriptor of ours (see the module's docstring), locked as HDF5 would lock it.

    Raises what h5py raises: FileNotFoundError, BlockingIOError when locked by
    another process, OSError when the file is not HDF5; and the OSError of a failed read
    or write (ENOSPC, EIO) whatever h5py made of it.
    """
    flags = os.O_RDONLY if mode == "r" else os.O_RDWR | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags | os.O_CLOEXEC, 0o666)
    try:
        _lock(fd, exclusive=mode != "r")
        raw = _raw(fd, mode)
        file = h5py.File(raw, mode)
        try:
            yield OwnFile(file, fd)
        finally:
            try:
                _close(file, raw)
            finally:
                # Should HDF5 keep the file open all the same, nothing it does with it
                # later reaches the descriptor's number, soon another file's.
                raw.close()
    finally:
        os.close(fd)


def _close(file: h5py.File, raw: _WholeIO) -> None:
    """Close ``file``: HDF5 writes what it kept (metadata) and trims the file. Raises
    the OSError of a write that failed meanwhile (ENOSPC, EIO): the file is then not
    whole, and HDF5 has let go of it all the same (see :class:`_WholeIO`)."""
    raw.closing = True
    file.close()
    if raw.failed is not None:
        raise raw.failed
