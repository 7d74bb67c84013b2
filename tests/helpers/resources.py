"""What a process uses (Linux ``/proc``): resident memory, its high-water mark, its workers,
its descriptors (and none left)."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import resource
import termios
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import trio

from fl_coordinator._proto import health_pb2


def _io(name: str) -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {name} in /proc/self/io")


def bytes_read() -> int:
    """Bytes this process has read with read(2) and the like, all threads (``rchar``)."""
    return _io("rchar")


def read_calls() -> int:
    """Calls this process has made to read(2) and the like, all threads (``syscr``)."""
    return _io("syscr")


def _field(pid: int | str, name: str) -> int:
    """A ``kB`` field of /proc/<pid>/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no {name} in /proc/{pid}/status")


def rss(pid: int | str = "self") -> int:
    return _field(pid, "VmRSS")


def peak_rss(pid: int | str = "self") -> int:
    """The resident high-water mark (VmHWM) since the process began, or since reset_peak."""
    return _field(pid, "VmHWM")


def reset_peak(pid: int | str = "self") -> int:
    """Start the high-water mark again from the current resident size; return that size."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return rss(pid)


def children(pid: int | str = "self") -> list[int]:
    """Processes whose parent is ``pid``."""
    parent = os.getpid() if pid == "self" else int(pid)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            if int(fields[1]) == parent and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def check_workers(pid: int | str = "self") -> list[int]:
    """The live processes that check selectors' files for ``pid``.

    They are the children of its multiprocessing fork server, itself a child of ``pid``.
    """
    workers = []
    for child in children(pid):
        try:
            if b"multiprocessing.forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.extend(children(child))
        except OSError:
            continue
    return workers


def unread_in_pipes(pid: int) -> int:
    """Bytes waiting in the pipes process ``pid`` has open (a job sent to a stopped worker).

    Each pipe is opened again through /proc (root may) and asked how much it
    holds (FIONREAD), which reads nothing.
    """
    waiting = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if not os.readlink(fd).startswith("pipe:"):
                continue
            again = os.open(fd, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            waiting += int.from_bytes(fcntl.ioctl(again, termios.FIONREAD, bytes(4)), "little")
        finally:
            os.close(again)
    return waiting


async def job_sent_to(pid: int, limit: float = 10.0) -> None:
    """Wait until a job waits in a pipe of worker ``pid`` (stopped, it cannot take it)."""
    with trio.fail_after(limit):
        while not unread_in_pipes(pid):  # noqa: ASYNC110 (no event for another process's pipe)
            await trio.sleep(0.01)


def health(port: int, timeout: float = 2.0) -> str:
    """The health service's answer (grpcio, blocking), which must come within ``timeout``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        answer = check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


async def health_now(port: int, within: float = 2.0) -> str:
    return await trio.to_thread.run_sync(health, port, within)


def vm_size(pid: int) -> int:
    """The address space of process ``pid``, in bytes (what RLIMIT_AS bounds)."""
    fields = Path(f"/proc/{pid}/statm").read_text().split()
    return int(fields[0]) * os.sysconf("SC_PAGE_SIZE")


async def ended(pid: int, limit: float = 30.0) -> bool:
    """Wait until process ``pid`` (any, not only a child) has ended: True, or False after
    ``limit`` seconds. Woken by the kernel (a pidfd), not by polling; a process gone
    already counts as ended, and one that has ended may still wait to be reaped (its
    parent may not know yet: see :func:`exists`)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        with trio.move_on_after(limit):
            await trio.lowlevel.wait_readable(pidfd)
            return True
        return False
    finally:
        os.close(pidfd)


def exists(pid: int) -> bool:
    """Whether process ``pid`` is still there (a zombie not yet reaped counts)."""
    return Path(f"/proc/{pid}").exists()


async def thread_slots_in_use(limit: float = 10.0) -> int:
    """trio's worker-thread slots that stay taken: all are borrowed back, waiting at most ``limit``.

    Threads that finish free their slot and the borrow goes on, so a slot
    counts as taken only if it is still held when the time is up (a leaked
    thread holds its slot forever).
    """
    limiter = trio.to_thread.current_default_thread_limiter()
    borrowers: list[object] = []
    with trio.move_on_after(limit):
        while len(borrowers) < limiter.total_tokens:
            borrower = object()
            await limiter.acquire_on_behalf_of(borrower)
            borrowers.append(borrower)
    for borrower in borrowers:
        limiter.release_on_behalf_of(borrower)
    return int(limiter.total_tokens) - len(borrowers)


def lowest_free_descriptor(pid: int | str = "self") -> int:
    """The descriptor number the next ``open`` of process ``pid`` would get."""
    if pid == "self":
        probe = os.open(os.devnull, os.O_RDONLY)
        os.close(probe)
        return probe
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(number for number in itertools.count() if number not in used)


@contextlib.contextmanager
def out_of_descriptors(pid: int | str = "self") -> Iterator[Callable[[], None]]:
    """Process ``pid`` can open nothing (EMFILE): its soft RLIMIT_NOFILE lowered to its
    lowest free descriptor, until the context ends or the function it gives is called."""
    target = 0 if pid == "self" else int(pid)
    soft, hard = resource.prlimit(target, resource.RLIMIT_NOFILE)
    resource.prlimit(target, resource.RLIMIT_NOFILE, (lowest_free_descriptor(pid), hard))

    def free() -> None:
        with contextlib.suppress(ProcessLookupError):  # a worker may have ended meanwhile
            resource.prlimit(target, resource.RLIMIT_NOFILE, (soft, hard))

    try:
        yield free
    finally:
        free()


class _WhenLogged(logging.Handler):
    def __init__(self, text: str, action: Callable[[], None], every: bool) -> None:
        super().__init__()
        self.text, self.action, self.every, self.seen = text, action, every, 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen += 1
            if self.seen == 1 or self.every:
                self.action()


@contextlib.contextmanager
def when_logged(
    logger: str, text: str, action: Callable[[], None], *, every: bool = False
) -> Iterator[_WhenLogged]:
    """Call ``action`` inside the logging call of the first record of ``logger`` (a name)
    whose message holds ``text`` (of each such record, if ``every``): at that point of the
    code, synchronously (a check that says it will try again, before it waits). The
    records of every level reach it that the logger lets through. ``seen``: how many
    such records came."""
    handler = _WhenLogged(text, action, every)
    logging.getLogger(logger).addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger(logger).removeHandler(handler)
