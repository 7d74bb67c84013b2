"""One owner per problem folder: the ownership lease (storage/ownership.py), in-process.

The command line's side (two ``serve`` processes on one root, ``rollback`` while
served) is in tests/cli/test_cli.py; a lease that cannot be written is here.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
import trio
from helpers.processes import COMMAND, Served, environment
from helpers.selector_fs import mounted, needs_fuse
from storage.test_disk_full import _mounted, fill

from fl_coordinator.config import Settings
from fl_coordinator.errors import ProblemError, first_of
from fl_coordinator.storage import ownership
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.ownership import (
    LEASE,
    MISSED,
    Lease,
    acquire,
    ensure_not_served,
    hold_ownership,
    holder,
)


def plant(layout: Layout, *, host: str, pid: int, age: float, scope: str | None = None) -> None:
    """A lease written by someone else, whose last heartbeat is ``age`` seconds old; in this
    process's pid namespace unless ``scope`` says where."""
    layout.own.mkdir(parents=True, exist_ok=True)
    owner = {"host": host, "pid": pid, "started": "2026-11-29T08:00:00+00:00",
             "heartbeat": time.time() - age, "instance": "theirs",
             "scope": ownership._scope() if scope is None else scope}  # fmt: skip
    planted = layout.own / "owner.json.planted"
    planted.write_text(json.dumps(owner))
    planted.replace(layout.own / "owner.json")  # whole, as an owner renews: watched meanwhile


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 2 MiB at ``tmp_path/disk``, unmounted after the test."""
    with _mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=2m", "tmpfs") as point:
        yield point


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_first_owns_and_a_second_is_refused_naming_the_first(layout: Layout) -> None:
    lease, previous = acquire(layout)
    assert previous is None and holder(layout) == lease.owner
    with pytest.raises(ProblemError) as refused:
        acquire(layout)
    message = str(refused.value)
    assert f"is served by {socket.gethostname()} pid {os.getpid()}" in message
    assert "stop that coordinator first" in message
    lease.release()
    assert holder(layout) is None
    acquire(layout)[0].release()  # free again


def test_a_live_lease_on_another_host_is_refused(layout: Layout) -> None:
    plant(layout, host="other-host", pid=4242, age=3)
    with pytest.raises(ProblemError, match=r"served by other-host pid 4242.*heartbeat 3 s ago"):
        acquire(layout)
    with pytest.raises(ProblemError, match=r"rollback refused: .* served by other-host pid 4242"):
        ensure_not_served(layout, "rollback")


def test_a_stale_lease_is_taken_over_only_when_asked(layout: Layout) -> None:
    plant(layout, host="other-host", pid=4242, age=LEASE + 60)
    with pytest.raises(ProblemError, match=r"last heartbeat is \d+ s old.*--take-over"):
        acquire(layout)
    assert holder(layout).host == "other-host"  # refusing changed nothing
    ensure_not_served(layout, "rollback")  # a stale owner does not block a rollback
    lease, previous = acquire(layout, take_over=True)
    assert previous is not None and previous.host == "other-host"
    assert holder(layout) == lease.owner


def test_a_provably_dead_owner_on_this_host_is_taken_over_with_a_warning(layout: Layout) -> None:
    plant(layout, host=socket.gethostname(), pid=dead_pid(), age=1)  # kill -9, then restart
    lease, previous = acquire(layout)
    assert previous is not None and previous.instance == "theirs"
    assert holder(layout) == lease.owner


@pytest.mark.parametrize("name", ["true", "z) R (z"], ids=["plain", "name with ') R ('"])
def test_a_zombie_owner_on_this_host_is_taken_over(
    layout: Layout, tmp_path: Path, name: str
) -> None:
    """kill -9 of a coordinator whose parent has not reaped it yet: kill(pid, 0) succeeds on
    the zombie, which is dead all the same. Its name may hold ')' and spaces: /proc/PID/stat
    then reads ``(z) R (z) Z ...``, whose state is the one after the last ')'."""
    command = tmp_path / name
    command.symlink_to(shutil.which("true"))
    child = subprocess.Popen([command])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        assert stat.startswith(f"{child.pid} ({name}) Z ")  # a zombie, by that name
        plant(layout, host=socket.gethostname(), pid=child.pid, age=1)
        ensure_not_served(layout, "rollback")  # not refused
        lease, previous = acquire(layout)
        assert previous is not None and previous.pid == child.pid
        assert holder(layout) == lease.owner
    finally:
        assert child.wait() == 0  # reaped


def test_a_live_owner_on_this_host_is_not_taken_over(layout: Layout) -> None:
    with subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE) as child:
        plant(layout, host=socket.gethostname(), pid=child.pid, age=1)
        with pytest.raises(
            ProblemError, match=rf"served by {socket.gethostname()} pid {child.pid}"
        ):
            acquire(layout)
        child.communicate(b"\n")


#: A coordinator's lease task in a pid namespace of its own (as a container's), on one root:
#: "hold" keeps it, renewing every 0.1 s; "try" says whether it got the folder, then ends.
_IN_A_CONTAINER = """
import functools, sys, trio
from fl_coordinator.config import default_settings
from fl_coordinator.errors import ProblemError
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.ownership import hold_ownership

async def main(root, mode):
    layout = Layout.from_settings(default_settings().replace(fl_root_path=root))
    async with trio.open_nursery() as nursery:
        hold = functools.partial(hold_ownership, layout, renew_every=0.1, watch_every=0.05)
        await nursery.start(hold)
        print("owned", flush=True)
        if mode == "try":
            nursery.cancel_scope.cancel()

try:
    trio.run(main, *sys.argv[1:])
except* ProblemError as refused:
    print(refused.exceptions[0], flush=True)
"""


#: Run in the container first: a sandbox whose /proc hides the kernel's boot id.
_BOOT_ID_HIDDEN = 'mount -t tmpfs none /proc/sys/kernel/random && exec "$@"'


def in_a_container(root: Path, mode: str, *, boot_id: bool = True) -> subprocess.Popen[str]:
    """``_IN_A_CONTAINER`` as pid 1 of a new pid namespace, with this host's name; without
    ``boot_id``, in one where the boot id cannot be read."""
    hidden = [] if boot_id else ["sh", "-c", _BOOT_ID_HIDDEN, "sh"]
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *hidden,
         sys.executable, "-c", _IN_A_CONTAINER, root, mode],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("boot_id", [True, False], ids=["proc", "boot-id-hidden"])
def test_a_live_twin_in_another_pid_namespace_is_not_taken_over(
    settings: Settings, boot_id: bool
) -> None:
    """Two containers given one host name (or sharing the host's, ``--network host``): each is
    pid 1 of its own namespace. The second took the first's live lease over at once, as the
    "earlier run with our pid" of a restarted container, and both served. Now it watches the
    lease, sees it renewed, and is refused, naming the first. Where /proc hides the boot id
    (or the namespace), the twins' scopes were both "" and so alike: taken over at once."""
    root = settings.fl_root_path
    twin = in_a_container(root, "hold", boot_id=boot_id)
    try:
        assert twin.stdout is not None and twin.stdout.readline() == "owned\n"
        theirs = holder(Layout.from_settings(settings))
        assert theirs is not None and theirs.pid == 1
        second = in_a_container(root, "try", boot_id=boot_id)
        said, _ = second.communicate(timeout=60)
        assert f"is served by {socket.gethostname()} pid 1 " in said
        where = "in another pid namespace (container)" if boot_id else "not known to be ours"
        assert where in said
        assert holder(Layout.from_settings(settings)).instance == theirs.instance
    finally:
        twin.kill()
        twin.wait()


def elsewhere(layout: Layout, age: float) -> None:
    """A lease written on this host in another pid namespace, last renewed ``age`` s ago."""
    plant(layout, host=socket.gethostname(), pid=1, age=age, scope="another-boot pid:[1]")


async def test_a_lease_from_another_pid_namespace_silent_two_renewals_is_taken_over(
    layout: Layout, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A restarted container (a new pid namespace) or a pod replaced under its own name: the
    lease left by a kill -9 is taken over with a warning once it has been silent MISSED s.

    The lease's age is real time (its heartbeat against ``time.time()``), the watch the
    MockClock's: the real seconds the test spends before the lease is judged (over 0.5 s
    on a loaded machine) make the watch that much shorter."""
    planted = time.time()
    elsewhere(layout, age=1)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(hold_ownership, layout))
        watched = trio.current_time() - start
        late = time.time() - planted  # at most: the lease was judged before this
        assert holder(layout).instance in ownership._HELD
        nursery.cancel_scope.cancel()
    assert MISSED - 1 - late - 1 < watched < MISSED
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "pid 1 (since 2026-11-29T08:00:00+00:00) in another pid namespace" in warnings[0]
    said = re.search(r"taken over if its lease is not renewed within (\d+) s$", warnings[0])
    assert said is not None and MISSED - 1 - late - 1 < int(said[1]) <= MISSED - 1, warnings[0]
    assert warnings[1].startswith("took ") and " over from " in warnings[1]


async def test_a_lease_from_another_pid_namespace_renewed_while_watched_is_refused(
    layout: Layout,
) -> None:
    """Its owner (a live twin) renews it within the watch: refused once the watch sees it
    (in 0.1 s; half the watch's length is the limit: a watch blind to the change would
    refuse it only at its end).

    The real clock, with short intervals: the watch looks at the lease in a worker thread,
    and a mock clock that jumps to the next deadline while a thread works ran the watch out
    (and the test's limit) on a loaded machine before the renewal was looked at."""
    elsewhere(layout, age=1)

    async def renewing() -> None:
        while True:
            await trio.sleep(0.05)
            elsewhere(layout, age=0)

    with pytest.raises(ExceptionGroup) as refused, trio.fail_after(MISSED / 2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(renewing)
            await nursery.start(functools.partial(hold_ownership, layout, watch_every=0.05))
            nursery.cancel_scope.cancel()  # taken over: no error, and the assertion fails
    error = first_of(refused.value, ProblemError)
    assert error is not None and "in another pid namespace (container) of this host" in str(error)
    assert holder(layout).instance == "theirs"


@pytest.mark.parametrize(
    ("scope", "where"),
    [
        ("another-boot pid:[1]", "in another pid namespace (container) of this host"),
        # An older coordinator beside this one in an upgrade may well be in our namespace:
        # "in another pid namespace (container)" sent its operator looking for a container.
        ("", "on this host, in a pid namespace not known to be ours"),
    ],
    ids=["elsewhere", "older"],
)
def test_a_lease_whose_pid_cannot_be_looked_up_is_judged_by_its_silence(
    layout: Layout, scope: str, where: str
) -> None:
    """Another namespace's, another boot's, or an older version's (no scope): its pid 1 is
    not ours to look up. Heard from lately, it is watched (Unproven) and keeps init and
    rollback out; silent MISSED s, it is taken over at once."""
    plant(layout, host=socket.gethostname(), pid=1, age=3, scope=scope)
    with pytest.raises(ownership.Unproven) as unproven:
        acquire(layout)
    assert MISSED - 3.5 < unproven.value.seconds <= MISSED - 3
    assert f"pid 1 (since 2026-11-29T08:00:00+00:00) {where}, heartbeat" in str(unproven.value)
    with pytest.raises(ProblemError, match=rf"rollback refused: .* pid 1 .* {re.escape(where)}"):
        ensure_not_served(layout, "rollback")
    plant(layout, host=socket.gethostname(), pid=1, age=MISSED, scope=scope)
    ensure_not_served(layout, "rollback")
    lease, previous = acquire(layout)
    assert previous is not None and previous.pid == 1 and holder(layout) == lease.owner


@pytest.mark.parametrize(
    ("host", "scope", "lapses"),
    [
        (socket.gethostname(), "another-boot pid:[1]", MISSED - 3),  # a killed container's
        ("other-host", None, LEASE - 3),  # a crashed host's
    ],
    ids=["another-namespace", "another-host"],
)
def test_init_and_rollback_refused_by_a_lease_say_when_a_stopped_ones_lapses(
    layout: Layout, host: str, scope: str | None, lapses: float
) -> None:
    """A lease whose owner is not looked up by its pid still counts a while after the owner
    stopped (kill -9 of its container): "stop that coordinator first" alone sent an operator
    who had just stopped it looking for a coordinator that was not there."""
    plant(layout, host=host, pid=1, age=3, scope=scope)
    with pytest.raises(ProblemError) as refused:
        ensure_not_served(layout, "rollback")
    assert str(refused.value).endswith(
        f"stop that coordinator first, then rollback (if it is stopped already, its lease "
        f"counts for {lapses:.0f} s more: rollback then)"
    )


def test_a_live_lease_judged_by_its_pid_says_nothing_of_lapsing(layout: Layout) -> None:
    """Its owner is alive: stopped, its lease would not count at all."""
    plant(layout, host=socket.gethostname(), pid=os.getppid(), age=3)
    with pytest.raises(ProblemError, match=r"then rollback$"):
        ensure_not_served(layout, "rollback")


#: The keys of a lease as the version before ``scope`` wrote them, and read them: it built its
#: Owner from exactly these, and took a lease with any other key for a damaged one.
_KEYS_BEFORE_SCOPE = {"host", "pid", "started", "heartbeat", "instance"}


def test_a_lease_is_still_read_by_the_version_before_scope(layout: Layout) -> None:
    """``scope`` had a key of its own: a coordinator of the version before (a replica not yet
    upgraded, an image rolled back, an ``init`` container of an older tag) read a live lease
    as naming no owner, so its rollback and init went ahead beside the coordinator, and its
    ``serve --take-over`` (which that refusal advised) took the live lease over. The scope
    now rides in ``instance``, which that version only compares."""
    lease, _ = acquire(layout)
    written = json.loads((layout.own / "owner.json").read_bytes())
    assert set(written) == _KEYS_BEFORE_SCOPE
    assert lease.owner.scope and lease.owner.scope in written["instance"]
    assert holder(layout) == lease.owner  # read back whole, scope included
    lease.renew()
    assert set(json.loads((layout.own / "owner.json").read_bytes())) == _KEYS_BEFORE_SCOPE
    assert holder(layout) == lease.owner
    lease.release()


def racing(monkeypatch: pytest.MonkeyPatch, starts: int) -> None:
    """Make ``starts`` threads each ask for the lease's lock before any of them has it."""
    barrier = threading.Barrier(starts, timeout=10)
    seen: set[int] = set()
    lock = ownership._lock

    def together(fd: int) -> bool:
        if len(seen) < starts and threading.get_ident() not in seen:  # each start's first try
            seen.add(threading.get_ident())
            barrier.wait()
        return lock(fd)

    monkeypatch.setattr(ownership, "_lock", together)


@pytest.fixture
def without_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage that cannot lock (NFS mounted ``nolock``: ENOLCK): the lease's own steps alone,
    which must still keep each of these interleavings to one owner."""

    def cannot(fd: int) -> bool:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(ownership, "_lock", cannot)


def acquired(layout: Layout, take_over: bool) -> Lease | ProblemError:
    """What a start got: its Lease, or the ProblemError that refused it."""
    try:
        return acquire(layout, take_over=take_over)[0]
    except ProblemError as error:
        return error


def acquire_at_once(layout: Layout, starts: int, take_over: bool) -> list[object]:
    """What each of ``starts`` simultaneous acquires got: a Lease, or the ProblemError."""
    outcomes: list[object] = [None] * starts

    def start(index: int) -> None:
        outcomes[index] = acquired(layout, take_over)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(starts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.mark.parametrize(
    ("host", "age", "take_over"),
    [("other-host", LEASE + 60, True), (socket.gethostname(), 1, False)],
    ids=["stale, --take-over", "provably dead"],
)
def test_of_starts_taking_one_lease_over_at_once_exactly_one_owns_the_folder(
    layout: Layout, monkeypatch: pytest.MonkeyPatch, host: str, age: float, take_over: bool
) -> None:
    """Each start judged the same old lease; replaced in place, each believed it had won
    and served beside the others until its next renewal. Then, with the lease's own steps
    alone, one that judged the old lease could move the winner's aside just as a third
    found the name free: two owners (CI, 1 run in about 30). They now take turns under the
    lock: one wins, and the others judge its lease, live, and are refused naming it, even
    with --take-over."""
    plant(layout, host=host, pid=4242 if take_over else dead_pid(), age=age)
    starts = 4
    racing(monkeypatch, starts)
    outcomes = acquire_at_once(layout, starts, take_over)
    leases = [outcome for outcome in outcomes if isinstance(outcome, Lease)]
    assert len(leases) == 1
    (lease,) = leases
    assert holder(layout) == lease.owner
    refused = f"{layout.root} is served by {lease.owner.describe()}, heartbeat "
    assert all(
        str(outcome).startswith(refused) and "stop that coordinator first" in str(outcome)
        for outcome in outcomes
        if outcome is not lease
    ), outcomes
    assert sorted(path.name for path in layout.own.iterdir()) == ["owner.json", "owner.lock", "tmp"]
    lease.release()


def test_a_start_waits_for_the_lock_only_so_long_and_a_renewal_goes_on_without_it(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the lock (its storage hangs mid-start, say; or it was stopped):
    a start waits LOCK_PATIENCE, then is refused with one line, nothing written. A renewal
    waits RENEW_PATIENCE, then renews without the lock: it raised, and the owner's lease
    lapsed while the lock stayed held, so that `init --force` and `rollback` went ahead
    beside a live coordinator (and a --take-over start would take it over). A clean stop's
    release, too, goes ahead (hold_ownership gives it 5 s)."""
    monkeypatch.setattr(ownership, "LOCK_PATIENCE", 0.2)
    monkeypatch.setattr(ownership, "RENEW_PATIENCE", 0.1, raising=False)
    lease, _ = acquire(layout)
    before = (layout.own / "owner.json").read_bytes()
    lock = layout.own / "owner.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ProblemError) as refused:
            acquire(layout, take_over=True)
        assert (layout.own / "owner.json").read_bytes() == before
        lease.renew()
        assert holder(layout) == lease.owner
        assert lease.owner.heartbeat > json.loads(before)["heartbeat"]
        with pytest.raises(ProblemError, match="is served by"):
            ensure_not_served(layout, "init")
        lease.release()
        assert holder(layout) is None
    assert str(refused.value) == (
        f"cannot take ownership of {layout.root}: another start or coordinator has held the "
        f"lock {lock} for over 0.2 s (its storage may hang); nothing was started: try again; "
        "if it stays locked, stop what holds it (lslocks names it, on the host that holds it)"
    )


async def test_a_start_waiting_for_the_lock_stops_at_once_when_cancelled(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT or SIGTERM while a start waits for the lock (held by a start that hangs): it
    stopped only after LOCK_PATIENCE (10 s), then said it could not take ownership, status
    2. The wait notices the cancellation; nothing is written."""
    monkeypatch.setattr(ownership, "LOCK_PATIENCE", 5.0)
    layout.own.mkdir(parents=True, exist_ok=True)
    held = os.open(layout.own / "owner.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        began = trio.current_time()
        with trio.move_on_after(0.3):
            await hold_ownership(layout)
        assert trio.current_time() - began < 4  # not LOCK_PATIENCE
    finally:
        os.close(held)
    assert not (layout.own / "owner.json").exists()


def test_a_lock_file_of_another_user_is_still_locked(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """owner.lock created by a coordinator run by another user of a shared folder (mode
    644): opening it for writing is refused (EACCES), and the start went on without the
    lock, silently, open to the race it closes. flock(2) needs only a descriptor."""
    layout.own.mkdir(parents=True, exist_ok=True)
    (layout.own / "owner.lock").touch()
    real_open = os.open

    def not_writable(path: object, flags: int, *args: int) -> int:
        if str(path).endswith("owner.lock") and flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(ownership.os, "open", not_writable)
    monkeypatch.setattr(ownership, "LOCK_PATIENCE", 0.2)
    with open(layout.own / "owner.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ProblemError, match="has held the lock"):
            acquire(layout)
    lease, _ = acquire(layout)
    lease.release()


@pytest.mark.parametrize("kind", ["folder", "named pipe", "character device"])
def test_a_lock_that_is_not_a_file_leaves_the_lease_to_its_own_steps(
    layout: Layout, kind: str
) -> None:
    """Whatever is at owner.lock that is not a regular file is never opened (opening a device
    can act, /dev/watchdog; a pipe's open could wait), nor what cannot be locked (a
    read-only folder, an NFS mount without locks): the folder is still owned, by its
    lease's own steps."""
    lock = layout.own / "owner.lock"
    layout.own.mkdir(parents=True, exist_ok=True)
    if kind == "folder":
        lock.mkdir()
    elif kind == "named pipe":
        os.mkfifo(lock)
    else:
        os.mknod(lock, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    opened: list[str] = []
    real_open = os.open

    def watched(path: object, flags: int, *args: int) -> int:
        opened.append(str(path))
        return real_open(path, flags, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ownership.os, "open", watched)
        lease, _ = acquire(layout)
    assert str(lock) not in opened
    with pytest.raises(ProblemError, match="is served by"):
        acquire(layout)
    lease.renew()
    lease.release()
    assert holder(layout) is None


def test_a_live_lease_is_not_taken_over_even_with_take_over(layout: Layout) -> None:
    """--take-over is for a stale lease (README, --help). It took a live one over too: of
    several starts with --take-over, one that looked after the winner had written its lease
    took that over in turn, and both served (4 processes: 2 or 3 owners in 7 of 10 tries)."""
    lease, _ = acquire(layout)
    with pytest.raises(ProblemError) as refused:
        acquire(layout, take_over=True)
    assert str(refused.value) == (
        f"{layout.root} is served by {lease.owner.describe()}, heartbeat 0 s ago; stop that "
        "coordinator first (only one may serve a problem)"
    )
    assert holder(layout) == lease.owner
    lease.release()


@pytest.mark.usefixtures("without_locks")
def test_a_start_that_judged_the_old_lease_leaves_the_winners_alone(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start judged the stale lease; another took the folder over before it went on. It
    renamed the winner's lease aside to compare it with the one it judged, then put it back:
    a third start at that moment found no lease and took the folder too, beside the winner."""
    plant(layout, host="other-host", pid=4242, age=LEASE + 60)
    judged, go = threading.Event(), threading.Event()
    late: list[threading.Thread] = []
    read, contents = ownership._read, ownership._contents

    def paused(layout: Layout) -> bytes | None:
        lease = read(layout)
        if threading.current_thread() in late:
            judged.set()
            assert go.wait(10)
        return lease

    third: list[object] = []

    def watched(path: Path) -> bytes:
        # The late start has renamed the winner's lease aside.
        if threading.current_thread() in late and path.name.endswith(".taken") and not third:
            third.append(acquire(layout))  # a start at that moment
        return contents(path)

    monkeypatch.setattr(ownership, "_read", paused)
    monkeypatch.setattr(ownership, "_contents", watched)
    outcome: list[object] = []

    def start() -> None:
        outcome.append(acquired(layout, True))

    late.append(threading.Thread(target=start))
    late[0].start()
    assert judged.wait(10)
    winner, _ = acquire(layout, take_over=True)
    go.set()
    late[0].join()
    assert third == []
    assert str(outcome[0]) == (
        f"{layout.root} was taken over at the same moment by {winner.owner.describe()}; only "
        "one coordinator may serve a problem"
    )
    assert holder(layout) == winner.owner
    winner.release()


def gone_stale(layout: Layout) -> Lease:
    """Our lease, its heartbeat a minute past the lease's term (renewals that failed, or a
    paused process): an operator may take it over while we still run."""
    lease, _ = acquire(layout)
    stale = {**asdict(lease.owner), "heartbeat": time.time() - LEASE - 60}
    (layout.own / "owner.json").write_text(json.dumps(stale))
    return lease


@pytest.mark.usefixtures("without_locks")
def test_a_renewal_while_a_take_over_has_the_lease_aside_does_not_replace_it(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner whose renewals failed for a while (a full disk) renews just as an operator's
    --take-over has renamed its stale lease aside. The renewal found no lease, went on, and
    replaced the one the take-over then created: both served until the next renewal. It now
    only creates a missing lease, and stops if it finds it taken."""
    lease = gone_stale(layout)
    aside, looked, done = threading.Event(), threading.Event(), threading.Event()
    taker: list[threading.Thread] = []
    contents = ownership._contents

    def interleaved(path: Path) -> bytes:
        if threading.current_thread() in taker and path.name.endswith(".taken"):
            aside.set()  # the take-over has the lease aside
            assert looked.wait(10)  # the renewal has looked for it
        try:
            return contents(path)
        finally:
            if threading.current_thread() is threading.main_thread() and aside.is_set():
                looked.set()
                assert done.wait(10)  # the take-over is through

    monkeypatch.setattr(ownership, "_contents", interleaved)
    outcome: list[object] = []

    def take_over() -> None:
        outcome.append(acquired(layout, True))
        done.set()

    taker.append(threading.Thread(target=take_over))
    taker[0].start()
    assert aside.wait(10)
    with pytest.raises(ProblemError) as stopped:
        lease.renew()
    taker[0].join()
    (taken,) = outcome
    assert isinstance(taken, Lease) and holder(layout) == taken.owner
    assert str(stopped.value) == (
        f"{layout.root}: ownership was taken over by {taken.owner.describe()}; this "
        "coordinator stops so that only one serves the problem"
    )
    taken.release()


@pytest.mark.usefixtures("without_locks")
def test_a_release_at_the_moment_of_a_take_over_keeps_the_new_owners_lease(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner whose lease went stale stops cleanly just as an operator's --take-over takes
    it over. The release read the lease (its own), the take-over replaced it, and the release
    then removed the new owner's lease by its name: the new owner served with no lease, and
    the next start without --take-over got the folder too."""
    lease = gone_stale(layout)
    contents = ownership._contents
    taken: list[object] = []

    def interleaved(path: Path) -> bytes:
        read = contents(path)
        if not taken:  # the release's look: the take-over happens right after it
            taken.append(None)
            taken[0] = acquired(layout, True)
        return read

    monkeypatch.setattr(ownership, "_contents", interleaved)
    lease.release()
    monkeypatch.undo()
    (new,) = taken
    assert isinstance(new, Lease) and holder(layout) == new.owner  # its lease stays
    new.release()
    assert sorted(path.name for path in layout.own.iterdir()) == ["owner.lock", "tmp"]


@pytest.mark.usefixtures("without_locks")
def test_a_take_over_of_a_lease_released_meanwhile_gets_the_folder(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An owner whose lease went stale stops cleanly just after an operator's --take-over
    judged its lease. The take-over found the lease gone and was refused: "taken over at the
    same moment by another start; only one coordinator may serve a problem", with the
    folder free and nobody else starting."""
    lease = gone_stale(layout)
    read = ownership._read

    def released_after_the_look(at: Layout) -> bytes | None:
        judged = read(at)
        lease.release()  # the old owner's clean stop, right after the look
        return judged

    monkeypatch.setattr(ownership, "_read", released_after_the_look)
    new = acquired(layout, True)
    monkeypatch.undo()
    assert isinstance(new, Lease) and holder(layout) == new.owner
    new.release()
    assert sorted(path.name for path in layout.own.iterdir()) == ["owner.lock", "tmp"]


def test_a_lease_that_cannot_be_read_is_named_with_what_to_do(layout: Layout) -> None:
    plant(layout, host="other-host", pid=4242, age=LEASE + 60)
    lease = layout.own / "owner.json"
    lease.unlink()
    lease.mkdir()  # read(2) answers EISDIR
    with pytest.raises(ProblemError) as refused:
        acquire(layout, take_over=True)
    assert str(refused.value) == (
        f"the ownership lease {lease} is a folder, not a regular file; nothing was started: "
        f"if no coordinator serves {layout.root}, remove it, then start again"
    )


def test_a_take_over_that_cannot_write_leaves_the_lease_it_judged(
    settings: Settings, disk: Path
) -> None:
    """The judged lease is renamed aside before ours is written: when ours cannot be (a
    full disk), the old one was deleted with the aside name, and the next start without
    --take-over got a folder whose owner may still be alive. It is put back."""
    layout = Layout.from_settings(settings.replace(fl_root_path=str(disk / "root")))
    plant(layout, host="other-host", pid=4242, age=LEASE + 60)
    judged = (layout.own / "owner.json").read_bytes()
    filler = fill(disk)
    with pytest.raises(ProblemError, match=r"No space left on device"):
        acquire(layout, take_over=True)
    assert (layout.own / "owner.json").read_bytes() == judged
    assert sorted(path.name for path in layout.own.iterdir()) == ["owner.json", "owner.lock", "tmp"]
    with pytest.raises(ProblemError, match=r"served by other-host pid 4242.*--take-over"):
        acquire(layout)  # still refused without --take-over
    filler.unlink()
    lease, previous = acquire(layout, take_over=True)
    assert previous is not None and previous.instance == "theirs"
    lease.release()


#: Leases with this program's keys but values it never writes (the folder is shared storage,
#: and anyone who can write it can write those): each crashed acquire and ensure_not_served
#: with a TypeError or an OverflowError, or a RecursionError in json.loads.
WRONG_VALUES = {
    "pid a string": {"pid": "4242"},
    "pid a float": {"pid": 4242.5},
    "pid too large": {"pid": 10**30},
    "heartbeat a string": {"host": "other-host", "heartbeat": "now"},
    "heartbeat too large": {"host": "other-host", "heartbeat": 10**400},
    "deeply nested": None,
}


@pytest.mark.parametrize("values", list(WRONG_VALUES))
def test_a_lease_with_values_of_the_wrong_kind_names_no_owner(layout: Layout, values: str) -> None:
    plant(layout, host=socket.gethostname(), pid=4242, age=1)
    lease = layout.own / "owner.json"
    changes = WRONG_VALUES[values]
    if changes is None:
        lease.write_text("[" * 100_000 + "]" * 100_000)
    else:
        lease.write_text(json.dumps({**json.loads(lease.read_text()), **changes}))
    with pytest.raises(ProblemError, match=r"exists but names no owner; .* --take-over"):
        acquire(layout)
    ensure_not_served(layout, "rollback")  # no owner named: nothing to wait for
    taken, previous = acquire(layout, take_over=True)
    assert previous is None and holder(layout) == taken.owner
    taken.release()


def test_an_owner_named_in_a_message_is_one_escaped_line(layout: Layout) -> None:
    """The host and start time come from a file anyone with the folder can write: a
    newline or a terminal escape in them forged lines in the log and on the terminal."""
    plant(layout, host="evil\x1b[2J\nINFO forged", pid=4242, age=1)
    with pytest.raises(ProblemError) as refused:
        acquire(layout)
    assert r"served by evil\x1b[2J\nINFO forged pid 4242" in str(refused.value)


#: What can be at owner.json instead of a file: how to make it, and what it is called.
NOT_FILES = {
    "named pipe": (os.mkfifo, "a FIFO (named pipe)"),
    "symbolic link to /dev/zero": (
        lambda path: path.symlink_to("/dev/zero"),
        "a symbolic link (links are not followed)",
    ),
    "folder": (os.mkdir, "a folder"),
    # open(2) of a socket answers ENXIO: it was called unreadable storage, "check its mount".
    "socket": (lambda path: os.mknod(path, stat.S_IFSOCK), "a socket"),
}

#: acquire() in a process of its own, its memory bounded: what it said, or its traceback.
ACQUIRE = """
import sys
from pathlib import Path
from fl_coordinator.errors import ProblemError
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.ownership import acquire
root = Path(sys.argv[1])
try:
    acquire(Layout(root, root, root, root, "", ""), take_over=sys.argv[2] == "take over")
except ProblemError as error:
    print(error)
"""


def acquire_bounded(layout: Layout, take_over: bool) -> str:
    """Before, reading the lease opened a named pipe and waited for a writer forever, and read
    /dev/zero or a sparse file of a TiB until memory ran out."""
    result = subprocess.run(
        ["prlimit", f"--as={2**31}", "--", sys.executable, "-c", ACQUIRE, str(layout.root),
         "take over" if take_over else "no"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    return result.stdout


@pytest.mark.parametrize("take_over", [False, True], ids=["", "--take-over"])
@pytest.mark.parametrize("kind", list(NOT_FILES))
def test_a_lease_that_is_not_a_file_is_named_without_reading_it(
    layout: Layout, kind: str, take_over: bool
) -> None:
    layout.own.mkdir(parents=True, exist_ok=True)
    lease = layout.own / "owner.json"
    make, called = NOT_FILES[kind]
    make(lease)
    assert acquire_bounded(layout, take_over) == (
        f"the ownership lease {lease} is {called}, not a regular file; nothing was started: "
        f"if no coordinator serves {layout.root}, remove it, then start again\n"
    )
    assert sorted(path.name for path in layout.own.iterdir()) == ["owner.json", "owner.lock", "tmp"]


@pytest.mark.parametrize("take_over", [False, True], ids=["", "--take-over"])
def test_a_huge_lease_is_not_read_whole(layout: Layout, take_over: bool) -> None:
    plant(layout, host="other-host", pid=4242, age=LEASE + 60)
    lease = layout.own / "owner.json"
    os.truncate(lease, 2**40)  # a TiB, sparse: JSON, then zeros
    said = acquire_bounded(layout, take_over)
    if take_over:
        assert said == "" and holder(layout).pid != 4242  # taken over
    else:
        assert said == (
            f"{lease} exists but names no owner; if no coordinator serves {layout.root}, start "
            "with --take-over\n"
        )


@pytest.mark.parametrize("take_over", [False, True], ids=["", "--take-over"])
def test_a_temporary_folder_that_is_a_file_is_named(layout: Layout, take_over: bool) -> None:
    """mkdir(.coordinator/tmp) answering EEXIST was taken for the lease's link doing so: the
    start was told the folder was taken over at the same moment by another start, or by the
    stale owner (before e546d75: that the lease names no owner)."""
    if take_over:
        plant(layout, host="other-host", pid=4242, age=LEASE + 60)
    shutil.rmtree(layout.tmp, ignore_errors=True)
    layout.own.mkdir(parents=True, exist_ok=True)
    layout.tmp.write_text("not a folder")
    with pytest.raises(ProblemError) as refused:
        acquire(layout, take_over=take_over)
    assert str(refused.value) == (
        f"{layout.tmp} is not a folder; nothing was started: if no coordinator serves "
        f"{layout.root}, remove it, then start again"
    )
    assert (holder(layout) is not None) == take_over  # the stale lease is still there


def test_a_renewal_after_a_take_over_refuses(layout: Layout) -> None:
    lease, _ = acquire(layout)
    lease.renew()  # still ours
    plant(layout, host="elsewhere", pid=7, age=0)  # an operator's --take-over
    with pytest.raises(ProblemError, match="ownership was taken over by elsewhere pid 7"):
        lease.renew()
    lease.release()
    assert holder(layout).host == "elsewhere"  # giving up never removes the new owner's lease


async def test_an_owner_that_was_taken_over_stops(layout: Layout) -> None:
    """The lease task ends its nursery (the whole coordinator) at its next renewal."""
    with pytest.raises(ExceptionGroup) as stopped, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(hold_ownership, layout, renew_every=0.01))
            plant(layout, host="elsewhere", pid=7, age=0)  # an operator's --take-over
            await trio.sleep_forever()  # until the lease task fails the nursery
    error = first_of(stopped.value, ProblemError)
    assert error is not None and "ownership was taken over by elsewhere pid 7" in str(error)


async def test_the_lease_is_renewed_while_every_default_worker_thread_waits(
    layout: Layout,
) -> None:
    """trio's default worker threads (40) all taken, as by calls on a selector's storage that
    hangs: the lease is still taken and renewed. Before, its file work waited for one of
    them: the lease lapsed, and a start watching it from another container took it over."""
    hung = threading.Event()
    renewed: list[float] = []

    async def renewals(task_status: trio.TaskStatus[None]) -> None:
        await hold_ownership(layout, renew_every=0.01, task_status=task_status)

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                taken = trio.to_thread.current_default_thread_limiter()
                for _ in range(int(taken.total_tokens)):
                    nursery.start_soon(
                        functools.partial(
                            trio.to_thread.run_sync, hung.wait, abandon_on_cancel=True
                        )
                    )
                await trio.testing.wait_all_tasks_blocked()
                assert taken.available_tokens == 0
                await nursery.start(renewals)
                while len(set(renewed)) < 3:  # two renewals after the first heartbeat
                    renewed.append(holder(layout).heartbeat)
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    finally:
        hung.set()


@needs_fuse
async def test_a_lease_that_cannot_be_read_at_a_clean_stop_is_said_to_stay(
    layout: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The folder's storage answers EIO as the coordinator stops: its lease stays behind, and
    the log says so. Before, giving up read the lease as "no lease" and said nothing."""
    backing, stop, stopped = tmp_path / "backing", trio.CancelScope(), trio.Event()

    async def owner(task_status: trio.TaskStatus[None]) -> None:
        with stop:
            await hold_ownership(layout, task_status=task_status)
        stopped.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(owner)
            layout.own.rename(backing)
            with mounted(backing, layout.own, "owner.json", "read", errno.EIO):
                stop.cancel()  # the clean stop, on failing storage
                await stopped.wait()
    assert json.loads((backing / "owner.json").read_text())["pid"] == os.getpid()  # stays
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"cannot remove the ownership lease {layout.own / 'owner.json'} ([Errno 5] Input/output "
        "error): the next start treats it as a crashed coordinator's"
    ]


#: Ways the lease's write fails: (what to run ``serve`` under, and the end of its one line).
#: A file size limit (RLIMIT_FSIZE) makes the write short, then EFBIG.
LEASE_FAULTS = {
    "disk full": ([], "[Errno 28] No space left on device; nothing was started: free space on "
                      "that file system, then start again"),
    "short write": (["prlimit", "--fsize=16", "--"], "[Errno 27] File too large; nothing was "
                    "started: raise this process's file size limit (ulimit -f), then start again"),
}  # fmt: skip


@pytest.mark.parametrize("fault", list(LEASE_FAULTS))
def test_a_lease_that_cannot_be_written_is_one_line_and_leaves_no_lease(
    settings: Settings, disk: Path, fault: str
) -> None:
    """A failed write leaves no owner.json (before: an empty one refused every later start,
    or a 16-byte one was served with), nothing in tmp/; once it can, the next start serves."""
    root = disk / "root"
    shutil.copytree(settings.fl_root_path, root)
    env = environment(root)
    limit, text = LEASE_FAULTS[fault]
    filler = fill(disk) if fault == "disk full" else None
    result = subprocess.run([*limit, *COMMAND, "serve"], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    lease = root / ".coordinator" / "owner.json"
    assert (result.returncode, result.stderr) == (
        2, f"fl-coordinator serve: cannot write the ownership lease {lease}: {text}\n"
    )  # fmt: skip
    assert not lease.exists()
    assert list((root / ".coordinator" / "tmp").iterdir()) == []
    if filler is not None:
        filler.unlink()
    with Served(env) as again:  # no --take-over needed
        again.ready()
        assert holder(Layout.from_settings(settings.replace(fl_root_path=str(root)))).pid == (
            again.process.pid
        )
        again.process.send_signal(signal.SIGTERM)
        assert again.process.wait(timeout=60) == 0


class _Renewals:
    """``Lease.renew``, wrapped: each call's errno (None: renewed) and the lease file's bytes
    after it, in ``outcomes``; :meth:`wait_for` returns once a condition on them holds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.outcomes: list[tuple[int | None, bytes]] = []
        self._condition: Callable[[list[tuple[int | None, bytes]]], bool] = lambda _: False
        self._met = trio.Event()
        renew = Lease.renew

        def recorded(lease: Lease) -> None:
            code = None
            try:
                renew(lease)
            except OSError as error:
                code = error.errno
                raise
            finally:
                self.outcomes.append((code, (lease.layout.own / "owner.json").read_bytes()))
                if self._condition(self.outcomes):  # in the renewal's thread
                    trio.from_thread.run_sync(self._met.set)

        monkeypatch.setattr(Lease, "renew", recorded)

    async def wait_for(self, condition: Callable[[list[tuple[int | None, bytes]]], bool]) -> None:
        self._condition, self._met = condition, trio.Event()
        await self._met.wait()


async def test_renewals_on_a_full_disk_keep_the_lease_and_warn_once(
    settings: Settings,
    disk: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ENOSPC on every renewal: the coordinator goes on, the lease keeps its last heartbeat
    (whole, ours), one warning (before: one per renewal); freed, it is renewed again."""
    layout = Layout.from_settings(settings.replace(fl_root_path=str(disk / "root")))
    renewals = _Renewals(monkeypatch)
    caplog.set_level(logging.INFO, "fl_coordinator.storage.ownership")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(hold_ownership, layout, renew_every=0.01))
            mine = holder(layout)
            filler = fill(disk)
            await renewals.wait_for(lambda done: [c for c, _ in done[-5:]] == [errno.ENOSPC] * 5)
            kept = {after for code, after in renewals.outcomes if code == errno.ENOSPC}
            assert len(kept) == 1  # no failed renewal changed the file
            assert ownership._parse(kept.pop()) == mine
            assert list(layout.tmp.iterdir()) == []
            filler.unlink()
            # Two: the loop has logged the first one's success before it made the second.
            await renewals.wait_for(lambda done: [c for c, _ in done[-2:]] == [None, None])
            assert holder(layout).heartbeat > mine.heartbeat
            nursery.cancel_scope.cancel()
    lease = layout.own / "owner.json"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"cannot renew the ownership lease {lease} ([Errno 28] No space left on device); the "
        "coordinator goes on and tries again every 0.01 s; 30 s after its last heartbeat "
        "another coordinator may take the folder over (serve --take-over)",
        f"the ownership lease {lease} is renewed again",
    ]
    assert not lease.exists()  # given up at the end
