"""Reading a selector's files as untrusted input.

A selector's folder (``FL_ROOT_PATH/<selector-id>/``) is written by another
party, on storage the coordinator does not control: it may hold any file
type, any link and any HDF5 feature. Everything the coordinator reads there
goes through this module, the way a browser treats a downloaded file: what
could reach outside the folder, block, or claim unbounded memory is refused
before it is used, with a :class:`~fl_coordinator.errors.ContributionError`
that names the file and what is wrong with it.

* **Paths.** Every component below the (trusted) root is opened with
  ``O_NOFOLLOW`` relative to its parent's descriptor, so no symbolic link is
  followed, neither the selector's folder nor the file. The file is first
  looked at with ``lstat``: anything but a regular file (a FIFO, a device, a
  socket, a link) is refused *without being opened*, because opening a FIFO
  blocks until a writer comes and opening a device can have side effects.
  Then it is opened ``O_NONBLOCK`` and ``fstat``-ed: a file swapped in
  between (not the inode ``lstat`` saw, or no longer a regular file) is
  refused. A file with more than one hard link is refused too: it is also
  a file somewhere else. Folder descriptors are closed as soon as the file
  is open, so a check holds one descriptor, whatever the number of
  selectors.
* **Sizes.** The size is known before anything is read: a weight file is
  read only if it is at most :data:`WEIGHT_MAX_BYTES`, an aggregate only if
  it is not absurdly larger than the global checkpoint implies.
* **HDF5.** The aggregate is opened from the descriptor (h5py's ``fileobj``
  driver), so HDF5 never resolves a path to it. A dataset is reached
  through hard links only, one path component at a time, never through a
  soft, external or user-defined link (HDF5 would follow those, into
  other files and FIFOs). Refused, before any value is read: virtual
  datasets (their values live in other files), external raw storage (the
  bytes of any file, ``/etc/passwd`` included), filters other than
  :data:`SAFE_FILTERS`, chunks larger than :data:`CHUNK_MAX_BYTES`. No
  compression is accepted: HDF5 inflates a deflate stream into a buffer it
  doubles until the stream ends, so a chunk declared small can claim any
  amount of memory, and its decompression time has no bound either. Keras
  and the Go selectors write uncompressed files.
* **Identity.** :class:`FileIdentity` records which file, exactly, passed
  its check (device, inode, size, modification and change times): the
  aggregation opens the file again by the same rules and refuses it if it
  is not the same, unchanged file (see ``checker.py``).

Text taken from a file (link targets, HDF5 messages, names) reaches logs
and status messages only through :func:`clip`: escaped and cut short.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import h5py
import numpy as np

from ..errors import ContributionError
from ..untrusted_text import shown, shown_ends
from .hdf5_fd import hdf5_on
from .weights import Encoding, Weight, accepts, encoding_of

__all__ = [
    "CHUNK_MAX_BYTES",
    "NAME_MAX_CHARS",
    "OURS",
    "REASON_MAX_CHARS",
    "SAFE_FILTERS",
    "WEIGHT_MAX_BYTES",
    "FileIdentity",
    "Opened",
    "OwnShortage",
    "UntrustedFile",
    "clip",
    "close_of",
    "dataset_at",
    "fstat_of",
    "raise_if_own_shortage",
    "read_of",
    "selector_error_is_own_shortage",
]

#: A weight file holds a decimal integer below 2**53 (16 digits) and a newline;
#: nothing longer is read.
WEIGHT_MAX_BYTES = 64

#: Largest chunk of a selector's dataset, in bytes (h5py's automatic chunks are
#: at most 1 MiB; Keras writes no chunks at all). Reading a chunk costs its size
#: in memory, so this bounds what a file can make the coordinator allocate.
CHUNK_MAX_BYTES = 8 * 2**20

#: HDF5 filters a selector's dataset may use: neither changes the size of the
#: data (shuffle reorders bytes, fletcher32 adds a 4-byte checksum).
SAFE_FILTERS = {h5py.h5z.FILTER_SHUFFLE: "shuffle", h5py.h5z.FILTER_FLETCHER32: "fletcher32"}

#: Longest reason (from a file) put in a log line or a status message.
REASON_MAX_CHARS = 300

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def clip(text: str, limit: int = REASON_MAX_CHARS) -> str:
    """A reason that quotes a selector's files: escaped and cut to ``limit`` characters,
    its start (which file) and its end (what is wrong) kept (see
    :func:`fl_coordinator.untrusted_text.shown_ends`)."""
    return shown_ends(text, limit)


def kind_of(mode: int) -> str:
    """What a file that is not a regular file is, for a person."""
    kinds = [(stat.S_ISLNK, "a symbolic link (links are not followed)"),
             (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a regular file")]  # fmt: skip
    return next((text for test, text in kinds if test(mode)), "not a regular file")


@dataclass(frozen=True)
class FileIdentity:
    """Which file, in which state: equal identities mean the same, unchanged file.

    The change time (``ctime``) is set by the kernel on every write, rename or
    ``chmod`` and cannot be set back by the writer (``mtime`` can): a file
    rewritten in place after its check has another one.
    """

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns,
                   status.st_ctime_ns)  # fmt: skip


#: errno values that say the coordinator ran out of its own resources (descriptors, memory),
#: not that a selector's file is wrong: raised as they are, never a ContributionError.
OURS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class OwnShortage(OSError):
    """The coordinator is out of its own resources (an errno of :data:`OURS`), and this
    is known: met on one of its own files (:func:`raise_if_own_shortage`), or on a
    selector's file and confirmed (:func:`selector_error_is_own_shortage`) where it
    failed to open.

    The one OSError out of reading a selector's files that blames nobody: any other,
    whatever its errno, is what the selector's file system answered, and rejects it.
    Raised in place of the error it stands for (same ``errno``, ``strerror`` and
    ``filename``), so a reader that does not care still sees that OSError.
    """

    @classmethod
    def of(cls, error: OSError) -> OwnShortage:
        return cls(error.errno, error.strerror, error.filename)


def raise_if_own_shortage(error: OSError) -> None:
    """For an error of one of the coordinator's OWN files (its checkpoint, its state, its
    copies, the selectors' root): raise it as :class:`OwnShortage` if its errno says the
    coordinator is out of its own resources (OURS). The errno of a file system the
    coordinator controls is believed; what follows would otherwise blame a file for it,
    or take it for another fault (a full disk). A selector's file's errno is not: see
    :func:`selector_error_is_own_shortage`."""
    if error.errno in OURS:
        raise OwnShortage.of(error) from None


def selector_error_is_own_shortage(error: OSError) -> bool:
    """For an error met on a SELECTOR's file: whether its errno is one of OURS and this
    process really is out of its own resources: it cannot open a descriptor of its own
    either (the null device, at once).

    The errno of a selector's file is not proof: a FUSE or network file system answers
    whatever its server likes (EMFILE to an ``open``), and taken at its word, a selector
    would fail every round for everyone instead of being rejected. In a worker (one
    thread) the test is exact for EMFILE; in the coordinator, a descriptor freed by
    another thread in between makes a real EMFILE the file's: its selector is refused,
    never the round failed for it. For the coordinator's own files:
    :func:`raise_if_own_shortage`.
    """
    if error.errno not in OURS:
        return False
    try:
        probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as own:
        return own.errno in OURS
    os.close(probe)
    return False


def _raise_if_selector_shortage(error: OSError) -> None:
    """Where opening a selector's file failed: raise ``error`` as :class:`OwnShortage` if
    :func:`selector_error_is_own_shortage` confirms it (else the caller rejects the file)."""
    if selector_error_is_own_shortage(error):
        raise OwnShortage.of(error) from None


def _answered(error: OSError) -> str:
    """What the file system answered, for a person: an errno of OURS that the coordinator
    is not short of (see :func:`selector_error_is_own_shortage`) is said to be the file system's."""
    if error.errno in OURS:
        return f"{error.strerror}, said its file system; the coordinator was not short of any"
    return str(error.strerror)


def fstat_of(fd: int, path: Path, what: str) -> os.stat_result:
    """``fstat`` of a selector's open file ``path``; ContributionError if its file system
    cannot answer, whatever the errno: an ``fstat`` allocates nothing of the coordinator's,
    so even an EMFILE is the file system's own answer (see
    :func:`selector_error_is_own_shortage`)."""
    try:
        return os.fstat(fd)
    except OSError as error:
        raise ContributionError(f"{path}: {what} cannot be read ({_answered(error)})") from None


def read_of(fd: int, count: int, path: Path, what: str) -> bytes:
    """Up to ``count`` bytes read from a selector's open file ``path``; ContributionError
    if its file system cannot answer, whatever the errno, as :func:`fstat_of`."""
    try:
        return os.read(fd, count)
    except OSError as error:
        raise ContributionError(f"{path}: {what} cannot be read ({_answered(error)})") from None


def close_of(fd: int) -> None:
    """Close ``fd``, a descriptor of a selector's file or folder, whatever its file
    system answers.

    A FUSE or network file system answers ``close`` with its server's reply to a flush
    (EIO, EMFILE, anything), and Linux releases the descriptor all the same
    (close(2)). Read-only, nothing is lost: what was read through it was checked
    already (the identity, the values). Raised, that errno would fail the averaging
    pass as the coordinator's fault, and after the new checkpoint was published
    (the pass closes its inputs last) say it was kept.
    """
    with contextlib.suppress(OSError):
        os.close(fd)


def _folder_problem(dir_fd: int, name: str, error: OSError) -> str:
    """Why folder ``name`` (in ``dir_fd``) could not be opened without following links."""
    try:
        found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return "is missing"
    except OSError:
        found = None
    if found is not None and not stat.S_ISDIR(found.st_mode):
        return f"is {kind_of(found.st_mode)}, not a folder"
    return f"cannot be opened ({_answered(error)})"


def _check_regular(status: os.stat_result, path: Path, what: str, max_bytes: int | None) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise ContributionError(f"{path}: {what} is {kind_of(status.st_mode)}, not a regular file")
    if status.st_nlink != 1:
        raise ContributionError(
            f"{path}: {what} has {status.st_nlink} hard links; it must be a file of its own, "
            "not a link to a file elsewhere"
        )
    if max_bytes is not None and status.st_size > max_bytes:
        raise ContributionError(
            f"{path}: {what} is {status.st_size} bytes; at most {max_bytes} are expected"
        )


@dataclass(frozen=True)
class UntrustedFile:
    """The file ``root/name``, every component of ``name`` opened without following links.

    ``root`` is trusted (``FL_ROOT_PATH``, which an operator may well make a
    link). With an ``identity``, the file must still be the one it names.
    """

    root: Path
    name: str
    identity: FileIdentity | None = None

    @classmethod
    def at(cls, path: Path) -> UntrustedFile:
        """``path``, whose last component only is untrusted."""
        return cls(path.parent, path.name)

    @functools.cached_property
    def path(self) -> Path:
        """``root / name``, made once: every reason and wait names it (70 joins in the
        averaging of ten small aggregates)."""
        return self.root / self.name

    def __getstate__(self) -> dict[str, object]:
        """The fields only: a check's result crosses to the coordinator without its path."""
        return {key: value for key, value in self.__dict__.items() if key != "path"}

    def open_fd(self, what: str, max_bytes: int | None = None) -> tuple[int, os.stat_result]:
        """Open the file read-only and non-blocking; return the descriptor and its ``fstat``.

        Raises ContributionError, naming the file, if a component is a link or
        not a folder, the file is not a regular file of its own, is larger than
        ``max_bytes``, or is not (any more) the file of ``identity``, whatever its
        file system answered; :class:`OwnShortage` if the coordinator is out of
        descriptors or memory (:data:`OURS`, confirmed): not the file's fault;
        the OSError of opening ``root`` (the coordinator's) otherwise.
        """
        parts = PurePosixPath(self.name).parts
        if not parts or parts[0] == "/" or ".." in parts:
            raise ValueError(f"not a relative path below the root: {self.name!r}")
        try:  # the root is the coordinator's: its errno is believed
            dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise_if_own_shortage(error)
            raise
        try:
            for depth, part in enumerate(parts[:-1], start=1):
                try:
                    inner = os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
                except OSError as error:
                    where = PurePosixPath(*parts[:depth])  # below the root: reasons are cut
                    _raise_if_selector_shortage(error)
                    problem = _folder_problem(dir_fd, part, error)
                    raise ContributionError(
                        f"{self.path}: {what} cannot be read: its folder '{where}' {problem}"
                    ) from None
                close_of(dir_fd)
                dir_fd = inner
            return self._open_last(dir_fd, parts[-1], what, max_bytes)
        finally:
            close_of(dir_fd)

    def _open_last(
        self, dir_fd: int, name: str, what: str, max_bytes: int | None
    ) -> tuple[int, os.stat_result]:
        path = self.path
        try:
            seen = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise ContributionError(f"{path}: {what} is missing") from None
        except OSError as error:
            _raise_if_selector_shortage(error)
            raise ContributionError(f"{path}: {what} cannot be read ({_answered(error)})") from None
        _check_regular(seen, path, what, max_bytes)  # a FIFO or a device is never opened
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as error:
            _raise_if_selector_shortage(error)
            raise ContributionError(
                f"{path}: {what} cannot be opened ({_answered(error)})"
            ) from None
        try:
            status = fstat_of(fd, path, what)
            if (status.st_dev, status.st_ino) != (seen.st_dev, seen.st_ino):
                raise ContributionError(f"{path}: {what} was replaced while it was being opened")
            _check_regular(status, path, what, max_bytes)
            if self.identity is not None and FileIdentity.of(status) != self.identity:
                raise ContributionError(f"{path}: {what} changed after it was checked")
        except BaseException:
            close_of(fd)
            raise
        return fd, status

    @contextlib.contextmanager
    def open_hdf5(
        self, what: str, max_bytes: int | None = None, chunk_cache: int = 0
    ) -> Iterator[Opened]:
        """The file as HDF5, read through its descriptor (see :meth:`open_fd`).

        ``chunk_cache``: bytes of HDF5's chunk cache per dataset. None by
        default, so K open inputs cost K times nothing: a chunk is then read
        whole for each read that wants part of it, or, unfiltered, read in
        one call per run of values the read wants (a column chunk read into
        rows: a call per value). Readers of whole chunks (the check, the
        aggregation's plain copies) read each once; with a cache of one chunk
        (CHUNK_MAX_BYTES at most) also in one call.
        """
        fd, status = self.open_fd(what, max_bytes)
        try:
            try:
                file = hdf5_on(fd, "r", rdcc_nbytes=chunk_cache)
            except (OSError, ValueError) as error:
                raise ContributionError(
                    f"{self.path}: {what} is not a readable HDF5 file ({error})"
                ) from None
            with file:
                yield Opened(self, file, fd, FileIdentity.of(status))
        finally:
            close_of(fd)


@dataclass(frozen=True)
class Opened:
    """An :class:`UntrustedFile` open as HDF5; ``identity`` is what ``fstat`` said at open."""

    source: UntrustedFile
    file: h5py.File
    fd: int
    identity: FileIdentity

    def changed(self) -> bool:
        """Whether the open file is no longer what it was when opened (written meanwhile),
        or its file system cannot say."""
        try:
            return FileIdentity.of(fstat_of(self.fd, self.source.path, "file")) != self.identity
        except ContributionError:
            return True


#: Most characters of a name that a file gives (a link's target, a filter's label) quoted
#: in a reason, so that the reason's own words after it survive its cut (REASON_MAX_CHARS).
NAME_MAX_CHARS = 64


def _named(value: bytes) -> str:
    """A name the file gives, quoted: decoded, escaped and cut to NAME_MAX_CHARS (counted
    after escaping: a character may take ten to write)."""
    return f"'{shown(value.decode(errors='replace'), NAME_MAX_CHARS)}'"


def _link_problem(group: h5py.Group, name: bytes, kind: int) -> str:
    """Why the link ``name`` (a path below ``group``) is refused, with where it leads."""
    if kind == h5py.h5l.TYPE_SOFT:
        target = _named(group.id.links.get_val(name))
        return f"is a soft link to {target} (only hard links are followed)"
    if kind == h5py.h5l.TYPE_EXTERNAL:
        file_name, object_name = (_named(value) for value in group.id.links.get_val(name))
        return (
            f"is an external link to {object_name} in {file_name} "
            "(links out of the file are refused)"
        )
    return f"is a user-defined link (type {kind}; only hard links are followed)"


def _hdf5_said(error: Exception) -> str:
    """What h5py or HDF5 said about a malformed file, for a reason: escaped, and cut to
    twice NAME_MAX_CHARS (it may quote the file's own bytes)."""
    return shown(str(error), 2 * NAME_MAX_CHARS)


def _not_found(file: h5py.File, parent: str, name: str) -> str:
    """Why HDF5 found no link to the next part of ``name`` below ``parent`` (reached
    through hard links; ``""``: the root): it is missing, ``parent`` is not a group, or
    ``parent``'s object header cannot be read (HDF5's reason, escaped and cut)."""
    if parent:
        try:
            kind = h5py.h5o.get_info(file.id, parent.encode()).type
        except (KeyError, RuntimeError, OSError, ValueError) as error:
            return f"{parent!r} cannot be read ({_hdf5_said(error)})"
        if kind != h5py.h5o.TYPE_GROUP:
            return f"{parent!r} is not a group, so {name!r} is missing"
    return f"dataset {name!r} is missing"


def _storage_problem(dataset: h5py.Dataset) -> str | None:
    """Why HDF5 would read more than this file, or unbounded memory, to read ``dataset``."""
    plist = dataset.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        return "is a virtual dataset (VDS): its values live in other files"
    if plist.get_external_count():
        first = _named(plist.get_external(0)[0])
        return f"stores its values in other files ({first}, ...: external storage)"
    for index in range(plist.get_nfilters()):
        code, _, _, label = plist.get_filter(index)
        if code not in SAFE_FILTERS:
            return (
                f"is stored with filter {_named(label)} (id {code}); aggregates must be "
                f"uncompressed (accepted filters: {', '.join(SAFE_FILTERS.values())})"
            )
    if layout == h5py.h5d.CHUNKED:
        chunk = plist.get_chunk()
        # HDF5's size of a value: its numpy dtype may not exist (see _type_named)
        nbytes = int(np.prod(chunk, dtype=object)) * dataset.id.get_type().get_size()
        if nbytes > CHUNK_MAX_BYTES:
            return f"declares chunks {chunk} of {nbytes} bytes; at most {CHUNK_MAX_BYTES} accepted"
    return None


def _type_named(dataset: h5py.Dataset) -> str:
    """The numpy dtype of ``dataset``, for a person, or why h5py has none (ValueError for a
    float type no numpy float can hold, TypeError for a class numpy has no match for)."""
    try:
        return shown(str(dataset.dtype), 60)
    except (TypeError, ValueError) as error:
        return f"of no numpy equivalent ({_hdf5_said(error)})"


def dataset_at(file: h5py.File, weight: Weight, path: Path) -> tuple[h5py.Dataset, Encoding]:
    """The dataset of ``weight`` in an untrusted file, and its encoding, if it can be averaged.

    Reached through hard links only; its storage must keep HDF5 inside this
    file and within :data:`CHUNK_MAX_BYTES` per chunk; its shape must be the
    weight's and its encoding one the weight accepts (its own, or a wider one:
    see :func:`.weights.accepts`). Raises ContributionError otherwise.
    """
    name = weight.name
    parts = name.split("/")
    # Each prefix's link is looked up from the root, in order: HDF5 then only ever
    # traverses links already found hard. Low-level calls (no h5py Group per level):
    # this was half of the check of a small aggregate (0.48 of 1.25 ms, fresh file).
    for depth in range(1, len(parts) + 1):
        where = "/".join(parts[:depth])
        key = where.encode()
        try:
            kind = file.id.links.get_info(key).type
        except (KeyError, RuntimeError):
            why = _not_found(file, "/".join(parts[: depth - 1]), name)
            raise ContributionError(f"{path}: {why}") from None
        if kind != h5py.h5l.TYPE_HARD:
            raise ContributionError(f"{path}: {where!r} {_link_problem(file, key, kind)}")
    try:
        found = h5py.h5o.open(file.id, name.encode())
    except KeyError as error:  # the link is there, its object header is not readable
        raise ContributionError(
            f"{path}: dataset {name!r} cannot be opened ({_hdf5_said(error)})"
        ) from None
    if not isinstance(found, h5py.h5d.DatasetID):
        raise ContributionError(f"{path}: {name!r} is not a dataset")
    node = h5py.Dataset(found)
    problem = _storage_problem(node)
    if problem is not None:
        raise ContributionError(f"{path}: dataset {name!r} {problem}")
    if node.shape != weight.shape:
        raise ContributionError(
            f"{path}: dataset {name!r} has shape {node.shape}, expected {weight.shape}"
        )
    try:
        encoding = encoding_of(node)
    except (TypeError, ValueError):
        encoding = None
    if encoding is None or not accepts(weight.encoding, encoding):
        given = encoding.name if encoding is not None else _type_named(node)
        raise ContributionError(
            f"{path}: dataset {name!r} has dtype {given}, expected {weight.encoding.name}"
        )
    return node, encoding
