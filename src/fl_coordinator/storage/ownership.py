"""One coordinator per problem folder: an ownership lease in ``.coordinator/owner.json``.

Two coordinators on one ``FL_ROOT_PATH`` (a second one started by mistake,
on this host or another) would both write the journal and the checkpoint and
split the rounds between them. So ``serve`` (and ``init``, ``rollback``) first
takes ownership of the folder, and refuses, naming the holder, while another
coordinator owns it.

Why a lease file and not an ``fcntl`` lock: the folder is shared storage,
usually NFS. ``fcntl`` locks there depend on the mount (``nolock`` is common
in containers, where they silently lock nothing), on lockd or NFSv4 state
that a server reboot or a network partition can lose without telling the
holder, and they cannot say who holds them. A file created only where
none exists (written whole to a temporary file, then hard-linked into place:
atomic on NFS too) works wherever files work, and says who holds it: the
owner's host, pid and start time, and a heartbeat it renews every
:data:`RENEW_EVERY` seconds (by atomic replacement). A lease that cannot be
written (a full disk, a quota, EIO, a short write) is therefore never left
half-written or empty, to block the next start: ``serve`` stops with one
line saying why, and a renewal that fails leaves the last heartbeat in place.
A lease whose heartbeat is older than :data:`LEASE` seconds is *stale*: its
owner died, or hangs, or is cut off.

Taking over: never silently. A stale lease is taken over only when the
operator says so (``serve --take-over``), since a coordinator cut off by a
network partition may still be alive. The one exception is a lease that is
provably dead, taken over with a warning in the log:

* written on this very host, in our pid namespace, by a process that no
  longer exists (or by an earlier run with our own pid);
* written on this host in another pid namespace, or before the host last
  booted (a restarted container: a new namespace, where it is pid 1 again;
  a pod replaced under its own name), or anywhere on this host if ``/proc``
  cannot tell our namespace, and silent for :data:`MISSED`
  seconds, two renewals. Its pid means nothing here: pid 1 of a *live*
  twin (two containers given one host name, or sharing the host's with
  ``--network host``) is not ours to look up. So ``serve`` watches such a
  lease until it has been silent that long, and refuses if it is renewed.

An owner that finds,
when renewing, that the lease names someone else (an operator took over)
stops at once rather than go on beside the new owner. Of several starts that
take one lease over at the same moment (a supervisor restarting two replicas
of a crashed coordinator), exactly one gets the folder: the lease is taken
over only if it is still the one judged (see ``_take_over``). Those steps
alone leave a window of a few system calls (one start moves the winner's new
lease aside to compare it just as a third finds the name free), so the starts,
renewals and releases also take turns under an advisory lock on
``.coordinator/owner.lock`` (:func:`_locked`): not what the ownership rests
on, for the reasons above, but where the storage honours locks (a local disk,
NFS with lockd or v4) it closes that window.

Clocks: staleness compares a heartbeat written by one host with the clock
of another, so hosts should run NTP; :data:`LEASE` (30 s) tolerates skew
well beyond what NTP leaves.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import socket
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import trio

from ..errors import ProblemError, os_error_text
from ..untrusted_text import shown
from .atomic import write_atomic
from .layout import Layout
from .untrusted import kind_of

__all__ = [
    "LEASE",
    "MISSED",
    "RENEW_EVERY",
    "Lease",
    "Owner",
    "acquire",
    "ensure_not_served",
    "hold_ownership",
    "holder",
]

log = logging.getLogger(__name__)

#: Seconds after its last heartbeat that a lease is stale.
LEASE = 30.0
#: Seconds between an owner's heartbeats.
RENEW_EVERY = 10.0
#: Seconds without a heartbeat after which an owner on this host whose pid cannot be looked
#: up (another pid namespace, an earlier boot) is dead: two renewals missed.
MISSED = 2 * RENEW_EVERY
#: Seconds between two looks at a lease watched for a sign of life.
WATCH_EVERY = 1.0

_FILE = "owner.json"
#: The advisory lock under which the lease is judged and changed (see :func:`_locked`).
_LOCK_FILE = "owner.lock"
#: Seconds a start, renewal or release waits for its turn at the lease (each takes
#: milliseconds; longer, the one before hangs on its storage).
LOCK_PATIENCE = 10.0
#: Seconds a renewal or a clean stop's release waits for the lock before going ahead without
#: it (the lease's own steps, as where the storage cannot lock): a lock held by a start that
#: hangs, or by anyone who can write the folder, must not let a live owner's lease lapse (then
#: init, rollback and demo went ahead beside it, and a --take-over start took it over).
RENEW_PATIENCE = 2.0

#: Instances this process holds now: a lease with our pid but not in here was written
#: by an earlier run that had the same pid (a restarted container's pid 1).
_HELD: set[str] = set()


@dataclass(frozen=True)
class Owner:
    """Who holds a problem folder: written in the lease file as JSON."""

    host: str
    pid: int
    started: str  # ISO 8601, UTC
    heartbeat: float  # seconds since the epoch, the owner's clock
    instance: str  # unique per coordinator run: tells an owner from its successor
    scope: str = ""  # where its pid means something (see _scope); "" in older leases (_encode)

    def describe(self) -> str:
        # Escaped: anyone who can write the folder chose these.
        where = ""
        if self.elsewhere():  # an older version's lease does not say where: perhaps beside us
            where = (
                " in another pid namespace (container) of this host"
                if _scope() is not None and self.scope
                else " on this host, in a pid namespace not known to be ours"
            )
        return f"{shown(self.host, 100)} pid {self.pid} (since {shown(self.started, 40)}){where}"

    def age(self, now: float) -> float:
        """Seconds since the last heartbeat (negative if the owner's clock is ahead)."""
        return now - self.heartbeat

    def elsewhere(self) -> bool:
        """Written on this host where its pid cannot be looked up: another pid namespace (a
        container), an earlier boot, or an older version that did not say; or anywhere on
        this host, if our own scope is unknown (twins that cannot read it write "" alike)."""
        mine = _scope()
        return self.host == socket.gethostname() and (mine is None or self.scope != mine)

    def unheard(self, now: float) -> float:
        """Seconds it must yet stay silent to be dead, if it is :meth:`elsewhere` (else 0)."""
        return min(MISSED, MISSED - self.age(now)) if self.elsewhere() else 0.0

    def provably_dead(self, now: float) -> bool:
        """Written on this host by a process that is gone (or a zombie), or by an earlier run
        with our pid; or :meth:`elsewhere` and silent for :data:`MISSED` seconds."""
        if self.host != socket.gethostname():
            return False
        if self.elsewhere():
            return self.unheard(now) <= 0
        if self.pid == os.getpid():
            return self.instance not in _HELD
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's: alive, or a zombie
            pass
        return _exited(self.pid)


@functools.cache
def _scope() -> str | None:
    """Where this process's pid means something: the boot of the kernel and the pid namespace,
    as ``BOOT_ID pid:[INODE]`` (proc(5), namespaces(7)); "" where there are no pid namespaces
    (not Linux: a pid means the same to every process of the host).

    A namespace's inode is unique while it lives, within one boot; the boot id tells a reboot
    (or another machine of the same name) apart. None, unknown, on a Linux whose ``/proc``
    is not mounted or hides either (some sandboxes): "" there would make two live twins'
    scopes alike, each pid 1, and the second would take the first's lease over at once.
    """
    if not sys.platform.startswith("linux"):
        return ""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited but is not reaped yet (a zombie, state Z or X).

    ``kill(pid, 0)`` succeeds on a zombie: a coordinator killed with ``kill -9``
    whose parent (a shell, a supervisor) has not waited for it yet. The state
    is the field after the command name in ``/proc/PID/stat`` (proc(5)); the
    name is in parentheses and may itself hold ``)`` and spaces, so the state
    follows the *last* ``)``. Without ``/proc`` (not Linux) nothing is proven.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rpartition(b")")[2].split()[:1] in ([b"Z"], [b"X"])


def _path(layout: Layout) -> Path:
    return layout.own / _FILE


class _LockHeld(TimeoutError):
    """Another process has held ``owner.lock`` longer than a start waits (an OSError, as a
    renewal's other failures; not any ETIMEDOUT of the storage, which says something else)."""


def _lock(fd: int) -> bool:
    """Take the lock on ``fd`` if free: True; False if another holds it. OSError if this
    storage cannot lock (ENOLCK, EOPNOTSUPP, EINVAL, EBADF). NFS mounted ``nolock`` says
    nothing: there the lock is taken, but keeps out only the callers of this host."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def _locked(layout: Layout, *, or_without: bool = False) -> Iterator[None]:
    """Judge and change the lease alone among the processes that lock ``.coordinator/
    owner.lock``, where the storage honours locks; go ahead without it where it does not
    (it cannot be opened or locked: a read-only folder, ``nolock``), the lease's own steps
    then alone (see the module's docstring).

    :class:`_LockHeld` (an OSError) if another has held it :data:`LOCK_PATIENCE` seconds; with
    ``or_without`` (a renewal, a release), on without it after :data:`RENEW_PATIENCE`. The
    file is never removed: two starts would then lock two different files.
    """
    path = layout.own / _LOCK_FILE
    try:  # no .coordinator/ yet (a new folder): no lease to take over, nothing to lock
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(mode := os.lstat(path).st_mode):  # never opened: opening a
                raise _NotAFile(kind_of(mode))  # device can act (/dev/watchdog), a pipe block
        flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
        except PermissionError:
            # Created by a coordinator run by another user of a shared folder (mode 644):
            # flock(2) needs no write access (except where NFS emulates it with fcntl: then
            # EBADF, and the lease's own steps alone, below).
            fd = os.open(path, os.O_RDONLY | flags)
    except OSError:
        fd = -1  # the lease's own steps then say what is wrong with the folder
    if fd < 0:
        yield
        return
    try:
        deadline = time.monotonic() + (RENEW_PATIENCE if or_without else LOCK_PATIENCE)
        while True:
            try:
                if _lock(fd):
                    break
            except OSError:
                break  # no locks on this storage: the lease's own steps alone
            if time.monotonic() > deadline:
                if or_without:
                    break  # the lease's own steps alone, rather than let a live lease lapse
                raise _LockHeld(
                    errno.ETIMEDOUT,
                    f"another start or coordinator has held the lock {path} for over "
                    f"{LOCK_PATIENCE:g} s (its storage may hang)",
                )
            _check_cancelled()
            time.sleep(0.005)
        yield
    finally:
        os.close(fd)  # and the lock with it


def _check_cancelled() -> None:
    """trio.Cancelled if this is a trio worker thread whose caller was cancelled (SIGINT,
    SIGTERM during a start's wait for the lock: it waited LOCK_PATIENCE, then said it could
    not take ownership, status 2); nothing outside trio's threads."""
    with contextlib.suppress(RuntimeError):  # not a trio worker thread: a test, a tool
        trio.from_thread.check_cancelled()


#: Bytes of a lease read at most: ours are a few hundred; a larger file is no lease of ours.
_MOST = 65536


class _NotAFile(OSError):
    """What is at the lease's name is not a regular file (``kind`` says what it is)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _contents(path: Path) -> bytes:
    """The first bytes (at most _MOST + 1) of the lease file at ``path``; _NotAFile if it is not a
    regular file, without reading it. Anyone who can write the folder can put anything there: a
    named pipe (reading it waited for a writer forever), a symbolic link to /dev/zero or a sparse
    file of a TiB (read until memory ran out). Opening a device (/dev/watchdog) can act."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        # O_NOFOLLOW answers ELOOP for a link (we write files, never links); open(2) of a
        # socket answers ENXIO: named as what they are, not taken for failing storage.
        if error.errno in (errno.ELOOP, errno.ENXIO):
            mode = os.lstat(path).st_mode
            if not stat.S_ISREG(mode):
                raise _NotAFile(kind_of(mode)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _NotAFile(kind_of(mode))
        chunks: list[bytes] = []
        read = 0
        while read <= _MOST and (chunk := os.read(fd, _MOST + 1 - read)):
            chunks.append(chunk)
            read += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def holder(layout: Layout) -> Owner | None:
    """The current owner of ``layout``'s folder, if any (None for an unreadable lease too)."""
    try:
        return _parse(_contents(_path(layout)))
    except OSError:
        return None


def _parse(lease: bytes) -> Owner | None:
    """The owner a lease's bytes name (None: damaged, or not a lease of this program)."""
    try:
        owner = Owner(**json.loads(lease))
    except (ValueError, TypeError, RecursionError):  # RecursionError: "[[[[..."
        return None
    # Values this program never writes would crash kill(2) or the arithmetic on them.
    texts = (owner.host, owner.started, owner.instance, owner.scope)
    if not all(isinstance(text, str) for text in texts):
        return None
    if type(owner.pid) is not int or not 0 < owner.pid < 2**31:
        return None
    if type(owner.heartbeat) not in (int, float) or not abs(owner.heartbeat) < 1e15:  # not NaN
        return None
    instance, _, scope = owner.instance.partition(" ")  # see _encode
    return replace(owner, instance=instance, scope=scope) if scope else owner


def _read(layout: Layout) -> bytes | None:
    """The lease's bytes, None if there is none; ProblemError if it cannot be read."""
    path = _path(layout)
    try:
        return _contents(path)
    except FileNotFoundError:
        return None
    except _NotAFile as error:
        raise ProblemError(
            f"the ownership lease {path} is {error.kind}, not a regular file; nothing was "
            f"started: if no coordinator serves {layout.root}, remove it, then start again"
        ) from None
    except OSError as error:
        raise ProblemError(
            f"cannot read the ownership lease {path}: {os_error_text(error)}; nothing was "
            f"started: {_advice(error, path.parent)}; if no coordinator serves "
            f"{layout.root}, remove that file, then start again"
        ) from None


def _me() -> Owner:
    return Owner(
        host=socket.gethostname(),
        pid=os.getpid(),
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        heartbeat=time.time(),
        instance=uuid.uuid4().hex,
        scope=_scope() or "",  # unknown: "", which every start of this host watches
    )


class Lease:
    """The ownership of a problem folder, held by this process. Blocking I/O: use a thread."""

    def __init__(self, layout: Layout, owner: Owner) -> None:
        self.layout = layout
        self.owner = owner
        _HELD.add(owner.instance)

    def renew(self) -> None:
        """Renew the heartbeat; ProblemError if another coordinator has taken over."""
        with _locked(self.layout, or_without=True):
            self._renew()

    def _renew(self) -> None:
        path = _path(self.layout)
        try:
            there: bytes | None = _contents(path)
        except FileNotFoundError:
            there = None
        except OSError:  # not a file, or unreadable: replaced, as a damaged lease
            there = b""
        current = _parse(there) if there else None
        if current is not None and current.instance != self.owner.instance:
            raise self._taken(current)
        self.owner = replace(self.owner, heartbeat=time.time())
        if there is None:
            # Gone: perhaps renamed aside by a take-over, which then creates its own; replaced,
            # that one would serve beside us. Created only where none is, then.
            if not _create(self.layout, self.owner):
                raise self._taken(holder(self.layout))
            return
        write_atomic(path, _encode(self.owner), self.layout.tmp)

    def _taken(self, current: Owner | None) -> ProblemError:
        return ProblemError(
            f"{self.layout.root}: ownership was taken over by {_who(current)}; "
            "this coordinator stops so that only one serves the problem"
        )

    def release(self) -> None:
        """Give the folder up (a clean stop), unless someone else has taken it over.

        OSError if the lease cannot be read (EIO): it stays behind, for the caller to say.
        """
        _HELD.discard(self.owner.instance)
        with _locked(self.layout, or_without=True):
            self._release()

    def _release(self) -> None:
        try:
            current = _parse(_contents(_path(self.layout)))
        except (FileNotFoundError, _NotAFile):  # gone, or replaced by what is no lease of ours
            return
        if current is None or current.instance != self.owner.instance:
            return
        # Not unlinked by its name: a take-over may have replaced it since we looked.
        _moved_aside(
            _path(self.layout),
            f"{self.owner.instance}.released",
            lambda lease: (
                (found := _parse(lease)) is not None and found.instance == self.owner.instance
            ),
        )


def _who(owner: Owner | None) -> str:
    """``owner`` for a person; a lease gone in between (moved aside by a start) names no one."""
    return owner.describe() if owner is not None else "another start"


def _encode(owner: Owner) -> bytes:
    """The lease file's bytes. The scope rides in ``instance`` (after a space; a uuid has none),
    which the version before it only compares: a key of its own made the whole lease a damaged
    one to that version (it builds its Owner from exactly its keys), so beside a live
    coordinator its init and rollback went ahead, and its ``serve --take-over`` took over."""
    fields = asdict(owner)
    if scope := fields.pop("scope"):
        fields["instance"] = f"{owner.instance} {scope}"
    return json.dumps(fields).encode()


def _refusal(layout: Layout, current: Owner, now: float) -> str:
    age = current.age(now)
    if age < LEASE:
        return (
            f"{layout.root} is served by {current.describe()}, heartbeat {max(age, 0):.0f} s "
            "ago; stop that coordinator first (only one may serve a problem)"
        )
    return (
        f"{layout.root} was served by {current.describe()}, whose last heartbeat is "
        f"{age:.0f} s old (a lease lasts {LEASE:.0f} s): it died, hangs or is cut off; if it "
        "is really stopped, start again with --take-over"
    )


def _create(layout: Layout, owner: Owner) -> bool:
    """Publish the lease of ``owner`` unless one exists: whole, or not at all."""
    try:
        layout.tmp.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # not the lease's link: that would be another start's lease
        raise ProblemError(
            f"{layout.tmp} is not a folder; nothing was started: if no coordinator serves "
            f"{layout.root}, remove it, then start again"
        ) from None
    try:
        write_atomic(_path(layout), _encode(owner), layout.tmp, exclusive=True)
    except FileExistsError:
        return False
    return True


def _take_over(layout: Layout, judged: bytes, owner: Owner) -> bool:
    """Replace the lease whose bytes are ``judged`` with ``owner``'s; False if it was not
    there any more (another start took the folder, or its owner released it).

    A compare-and-swap out of two atomic steps, so that of several starts taking
    over one lease at once exactly one gets the folder. Replacing the lease in place
    would let each of them believe it won, and serve beside the others until its
    next renewal. Instead the lease is renamed aside (of several renames of one
    name, one succeeds), checked to be the one judged (a lease put there since is
    put back), and ours is created only where none is (``link(2)``).
    """
    path = _path(layout)
    try:
        # A lease that changed since it was judged (another start's) is not even moved aside:
        # while it is, a start finds no lease and takes the folder, beside that start.
        if _contents(path) != judged:
            return False
    except FileNotFoundError:
        return False
    # Someone's newer lease is not ours to take: put back.
    return _moved_aside(
        path, f"{owner.instance}.taken", lambda lease: lease == judged and _create(layout, owner)
    )


def _moved_aside(path: Path, tag: str, gone: Callable[[bytes], bool]) -> bool:
    """Rename the lease ``path`` aside (to ``owner.json.TAG``), then keep it gone only if
    ``gone(its bytes)`` says so (it is ours to remove, or ours replaced it): True then;
    else, or if ``gone`` raises, put it back. False if there was no lease to move.

    Of several renames of one name, one succeeds: the lease looked at is the one moved,
    and nobody can replace it meanwhile (they would create a new one, which the
    putting back does not overwrite). Not in tmp/: a start cleans that.
    """
    aside = path.with_name(f"{_FILE}.{tag}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        if not aside.exists():  # else an NFS retransmission whose first reply was lost
            return False
    kept_gone = False
    try:
        kept_gone = gone(_contents(aside))
        return kept_gone
    finally:
        if not kept_gone:
            with contextlib.suppress(FileExistsError, FileNotFoundError):
                os.link(aside, path)
        aside.unlink(missing_ok=True)


def _advice(error: OSError, folder: Path) -> str:
    """What an operator does about a lease that cannot be written."""
    if error.errno == errno.ENOSPC:
        return "free space on that file system"
    if error.errno == errno.EDQUOT:
        return f"free space or raise the disk quota of this user (uid {os.getuid()})"
    if error.errno == errno.EROFS:
        return "mount that file system read-write"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"make {folder} writable by this user (uid {os.getuid()})"
    if error.errno == errno.EFBIG:
        return "raise this process's file size limit (ulimit -f)"
    return "check that storage (its mount, its server, the kernel log)"


def _unwritable(path: Path, error: OSError) -> ProblemError:
    return ProblemError(
        f"cannot write the ownership lease {path}: {os_error_text(error)}; nothing was "
        f"started: {_advice(error, path.parent)}, then start again"
    )


class Unproven(ProblemError):
    """The lease is :meth:`Owner.elsewhere`'s, heard from too lately to know whether it lives:
    watch it for ``seconds`` more, then :func:`acquire` again with ``watched=judged``."""

    def __init__(self, message: str, owner: Owner, judged: bytes, seconds: float) -> None:
        super().__init__(message)
        self.owner = owner
        self.judged = judged
        self.seconds = seconds


def acquire(
    layout: Layout, *, take_over: bool = False, watched: bytes | None = None
) -> tuple[Lease, Owner | None]:
    """Own ``layout``'s folder; return the lease and the owner taken over from, if any.

    Raises ProblemError naming the holder while another coordinator owns it or
    its lease is stale, unless ``take_over`` (the operator's deliberate choice)
    or the holder is provably dead; :class:`Unproven` if that cannot be known
    without watching the lease. ``watched``: the bytes of a lease watched that
    long (see :func:`hold_ownership`); still the same, its owner is dead.
    """
    try:
        with _locked(layout):
            return _acquire(layout, take_over, watched)
    except _LockHeld as error:
        raise ProblemError(
            f"cannot take ownership of {layout.root}: {error.strerror}; nothing was started: "
            "try again; if it stays locked, stop what holds it (lslocks names it, on the "
            "host that holds it)"
        ) from None


def _acquire(layout: Layout, take_over: bool, watched: bytes | None) -> tuple[Lease, Owner | None]:
    me = _me()
    path = _path(layout)
    try:
        layout.own.mkdir(parents=True, exist_ok=True)
        if _create(layout, me):
            return Lease(layout, me), None
    except OSError as error:
        # A coordinator that took the folder a moment ago may have removed our
        # temporary file (clean_tmp): its lease is then there, and named below.
        if not path.exists():
            raise _unwritable(path, error) from None
    judged, current = _read(layout), None
    if judged is not None:
        current = _parse(judged)
        if current is None:  # damaged, or written in place by an older version
            if not take_over:
                raise ProblemError(
                    f"{path} exists but names no owner; if no coordinator serves "
                    f"{layout.root}, start with --take-over"
                )
        # --take-over is for a stale lease: a live one may be the winner's of several starts.
        elif judged != watched and not current.provably_dead(now := time.time()):
            if watched is None and (seconds := current.unheard(now)) > 0:
                raise Unproven(_refusal(layout, current, now), current, judged, seconds)
            if not take_over or current.age(now) < LEASE:
                raise ProblemError(_refusal(layout, current, now))
    try:
        # No lease now (released since our try): create one; else take the judged one over.
        if _create(layout, me) if judged is None else _take_over(layout, judged, me):
            return Lease(layout, me), current
        # The judged lease gone since (its owner stopped cleanly): free, as for a first start.
        # (Another start's there, or created first, is not replaced: link(2) refuses.)
        if judged is not None and _create(layout, me):
            return Lease(layout, me), None
    except OSError as error:
        try:
            there = _contents(path)
        except OSError:
            there = None
        if there is None or there == judged:  # else another start's lease, named below
            raise _unwritable(path, error) from None
    # Another start took the folder first: its lease is not the one judged, so it is
    # not taken over (not even with --take-over, which was said of the one before).
    raise ProblemError(
        f"{layout.root} was taken over at the same moment by {_who(holder(layout))}; "
        "only one coordinator may serve a problem"
    )


def _unchanged(layout: Layout, judged: bytes) -> bool:
    """Whether the lease's bytes are still ``judged`` (not if it cannot be read: judged again)."""
    try:
        return _contents(_path(layout)) == judged
    except OSError:
        return False


def ensure_not_served(layout: Layout, what: str) -> None:
    """Refuse ``what`` (e.g. "rollback") while a coordinator with a live lease owns the folder."""
    current, now = holder(layout), time.time()
    if current is not None and current.age(now) < LEASE and not current.provably_dead(now):
        raise ProblemError(
            f"{what} refused: {layout.root} is served by {current.describe()}; stop that "
            f"coordinator first, then {what}{_lapsing(current, now, what)}"
        )


def _lapsing(owner: Owner, now: float, what: str) -> str:
    """When ``owner``'s lease stops keeping ``what`` out once its coordinator has stopped, for
    an operator who has just stopped it (a killed container's lease stays behind); "" for one
    judged by its live pid, whose lease would not count at all once it stopped."""
    if owner.elsewhere():
        left = owner.unheard(now)
    elif owner.host != socket.gethostname():
        left = LEASE - owner.age(now)
    else:
        return ""
    return f" (if it is stopped already, its lease counts for {left:.0f} s more: {what} then)"


async def hold_ownership(
    layout: Layout,
    *,
    take_over: bool = False,
    renew_every: float = RENEW_EVERY,
    watch_every: float = WATCH_EVERY,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Own ``layout``'s folder while this task runs (started once it owns it), renewing the
    lease every ``renew_every`` seconds; give it up when cancelled. ProblemError if it
    cannot own it, or loses it.

    A lease whose owner's life cannot be looked up (:class:`Unproven`) is first watched,
    every ``watch_every`` seconds, until it has been silent :data:`MISSED` seconds (then
    taken over) or changes (then judged again: a renewal is refused).

    The lease's file work runs in a worker thread of its own, not in trio's default ones:
    those may all wait on a selector's storage that hangs, and a coordinator alive
    otherwise would let its lease lapse, to be taken over by a start that watches it.
    """
    thread = trio.CapacityLimiter(1)
    try:
        lease, previous = await trio.to_thread.run_sync(
            functools.partial(acquire, layout, take_over=take_over), limiter=thread
        )
    except Unproven as unproven:
        log.warning(
            "%s is held by %s, or was before this host last booted: that pid cannot be "
            "looked up from here; it is taken over if its lease is not renewed within %.0f s",
            layout.root,
            unproven.owner.describe(),
            unproven.seconds,
        )
        unchanged = functools.partial(_unchanged, layout, unproven.judged)
        with trio.move_on_after(unproven.seconds):
            while True:  # polled: a file on shared storage tells no one that it changed
                await trio.sleep(watch_every)
                if not await trio.to_thread.run_sync(
                    unchanged, abandon_on_cancel=True, limiter=thread
                ):
                    break
        lease, previous = await trio.to_thread.run_sync(
            functools.partial(acquire, layout, take_over=take_over, watched=unproven.judged),
            limiter=thread,
        )
    if previous is not None:
        log.warning("took %s over from %s", layout.root, previous.describe())
    try:
        task_status.started()
        failing = False
        while True:
            await trio.sleep(renew_every)
            try:
                await trio.to_thread.run_sync(lease.renew, abandon_on_cancel=True, limiter=thread)
            except OSError as error:  # a full or unreachable disk: the lease may go stale
                if not failing:  # once, not every renewal, while the disk stays full
                    log.warning(
                        "cannot renew the ownership lease %s (%s); the coordinator goes on and "
                        "tries again every %g s; %.0f s after its last heartbeat another "
                        "coordinator may take the folder over (serve --take-over)",
                        _path(layout),
                        os_error_text(error),
                        renew_every,
                        LEASE,
                    )
                failing = True
            else:
                if failing:
                    log.warning("the ownership lease %s is renewed again", _path(layout))
                failing = False
    finally:
        with trio.move_on_after(5) as cleanup:
            cleanup.shield = True
            try:
                await trio.to_thread.run_sync(lease.release, abandon_on_cancel=True, limiter=thread)
            except OSError as error:  # e.g. EROFS: left as after a crash (see the README)
                log.warning(
                    "cannot remove the ownership lease %s (%s): the next start treats it as a "
                    "crashed coordinator's",
                    _path(layout),
                    os_error_text(error),
                )
