"""A file whose opening ends (or hangs) the process that opens it, for certain.

A malformed file can crash HDF5 or send it into a loop; which bytes do that
depends on the library's version. This helper gives a test the effect without
the guesswork: with a fanotify *permission* mark (root, Linux), every ``open``
of the file by another process blocks in the kernel until this process
answers, and the answer is a signal to the opener (SIGKILL: a crash; SIGSTOP:
a check that makes no progress), then "denied". Nothing else is touched: this
process's own opens are allowed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import trio

__all__ = ["Kills", "fatal_to_open"]

_FAN_CLASS_CONTENT = 0x04
_FAN_NONBLOCK = 0x02
_FAN_CLOEXEC = 0x01
_FAN_MARK_ADD = 0x01
_FAN_OPEN_PERM = 0x10000
_FAN_DENY = 0x02
_AT_FDCWD = -100
#: struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid.
_EVENT = struct.Struct("=IBBHQii")
_RESPONSE = struct.Struct("=iI")  # struct fanotify_response: fd, response

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]  # fmt: skip


class Kills:
    """The processes signalled for opening the file, in order."""

    def __init__(self) -> None:
        self.pids: list[int] = []


def _checked(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


async def _answer(fan: int, kills: Kills, sent: signal.Signals) -> None:
    while True:
        await trio.lowlevel.wait_readable(fan)
        try:
            data = os.read(fan, 4096)
        except BlockingIOError:
            continue
        offset = 0
        while offset < len(data):
            length, _, _, _, _, fd, pid = _EVENT.unpack_from(data, offset)
            offset += length
            if pid != os.getpid():
                os.kill(pid, sent)
                kills.pids.append(pid)
                os.write(fan, _RESPONSE.pack(fd, _FAN_DENY))
            else:
                os.write(fan, _RESPONSE.pack(fd, 0x01))  # FAN_ALLOW
            os.close(fd)


@contextlib.asynccontextmanager
async def fatal_to_open(path: Path, sent: signal.Signals = signal.SIGKILL) -> AsyncIterator[Kills]:
    """Inside: any other process that opens ``path`` is sent ``sent`` before it reads."""
    fan = _checked(_libc.fanotify_init(_FAN_CLASS_CONTENT | _FAN_NONBLOCK | _FAN_CLOEXEC,
                                       os.O_RDONLY), "fanotify_init")  # fmt: skip
    kills = Kills()
    try:
        _checked(_libc.fanotify_mark(fan, _FAN_MARK_ADD, _FAN_OPEN_PERM, _AT_FDCWD,
                                     os.fsencode(path)), f"fanotify_mark {path}")  # fmt: skip
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_answer, fan, kills, sent)
            yield kills
            nursery.cancel_scope.cancel()
    finally:
        os.close(fan)
