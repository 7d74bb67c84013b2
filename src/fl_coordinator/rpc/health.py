"""The standard gRPC health service (``/grpc.health.v1.Health/Check``) for probes.

Kubernetes gRPC probes (and ``grpc_health_probe``) call it without a token,
so it is left open by :mod:`.auth`; it says nothing but SERVING or
NOT_SERVING. SERVING means the coordinator can do its job: the round task is
alive and the global checkpoint can be read (the shared folder is mounted and
the file is HDF5). The checkpoint is replaced by atomic rename after a round,
so a probe during aggregation still sees a readable file.

The file is opened in worker threads of their own (:func:`thread_limiter`),
not trio's default ones: those carry the journal, the aggregation and the
checkpoint's lease, and a flood of Checks on a hung mount (each thread stuck
in ``open``, each probe cut off after its 5 s) would otherwise take them all.
It is read without h5py: ``h5py.is_hdf5`` holds h5py's global lock, and
the GIL (h5py calls HDF5 without releasing it), through the ``open``, so
one probe stuck there stopped the whole process (the event loop, the
aggregation's thread) for as long.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import purerpc
import trio

from .._proto import health_grpc, health_pb2

__all__ = [
    "SERVICE_NAME",
    "THREADS",
    "HealthServicer",
    "Probe",
    "checkpoint_readable",
    "thread_limiter",
]

log = logging.getLogger(__name__)

SERVICE_NAME = "grpc.health.v1.Health"

#: A checkpoint that takes longer than this to open (a hung network mount) is unreadable.
_READ_TIMEOUT = 5.0

#: Worker threads that may read the checkpoint for probes at once (a probe that finds
#: them all taken waits, within its time limit, and answers NOT_SERVING if it runs out).
THREADS = 4

Probe = Callable[[], Awaitable[bool]]

_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("health_threads")


def thread_limiter() -> trio.CapacityLimiter:
    """The health probes' own :data:`THREADS` worker-thread slots in this trio run (as
    :func:`trio.to_thread.current_default_thread_limiter` is the default one)."""
    try:
        return _LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(THREADS)
        _LIMITER.set(limiter)
        return limiter


#: The HDF5 format signature, which starts the superblock (HDF5 File Format Specification,
#: "Format Signature"): at byte 0, or after a user block at 512, 1024, 2048... bytes.
_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_FIRST_USER_BLOCK = 512


def _is_readable_hdf5(path: Path) -> bool:
    """Whether ``path`` is a regular file that can be opened and read and holds the HDF5
    signature where the format puts it (blocking: run it in a thread).

    Plain system calls, as ``H5Fis_hdf5`` searches, without h5py's global
    lock; not a regular file (a FIFO, whose ``open`` would wait for a
    writer; a folder): False without opening it.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            offset = 0
            while offset + len(_SIGNATURE) <= size:
                if os.pread(fd, len(_SIGNATURE), offset) == _SIGNATURE:
                    return True
                offset = max(_FIRST_USER_BLOCK, 2 * offset)
            return False
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return False


async def checkpoint_readable(path: Path) -> bool:
    """:func:`_is_readable_hdf5` in one of the :func:`thread_limiter` threads, within
    ``_READ_TIMEOUT`` (waiting for a thread included); False when the time is up."""
    with trio.move_on_after(_READ_TIMEOUT):
        return await trio.to_thread.run_sync(
            _is_readable_hdf5, path, abandon_on_cancel=True, limiter=thread_limiter()
        )
    return False


class HealthServicer(health_grpc.HealthServicer):
    """Answers Check from ``probe`` (True = SERVING). Watch is not offered.

    ``served`` are the names of the other services on the same server: a probe
    may ask about any of them, about this one, or about "" (the whole server);
    any other name is NOT_FOUND.
    """

    def __init__(self, probe: Probe, served: Iterable[str] = ()) -> None:
        self._probe = probe
        self._known = frozenset({"", SERVICE_NAME, *served})
        self._last: bool | None = None

    async def Check(self, message: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        if message.service not in self._known:
            raise purerpc.RpcFailedError(
                purerpc.Status(purerpc.StatusCode.NOT_FOUND, "unknown service")
            )
        serving = await self._probe()
        if serving != self._last:
            log.log(
                logging.INFO if serving else logging.WARNING,
                "health: %s",
                "SERVING" if serving else "NOT_SERVING",
            )
            self._last = serving
        response = health_pb2.HealthCheckResponse
        return response(status=response.SERVING if serving else response.NOT_SERVING)

    async def Watch(self, message: health_pb2.HealthCheckRequest):  # type: ignore[override]
        raise purerpc.RpcFailedError(
            purerpc.Status(purerpc.StatusCode.UNIMPLEMENTED, "Watch is not offered; poll Check")
        )
        yield  # pragma: no cover - makes this an async generator, as the signature wants
