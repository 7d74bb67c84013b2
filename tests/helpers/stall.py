"""A file whose ``open`` hangs, as on a hung mount: another process's write lease on it
(``fcntl(F_SETLEASE)``). The kernel holds each ``open`` of the file until the lease is
given up, or for ``/proc/sys/fs/lease-break-time`` (45 s by default)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["open_stalled"]

#: Holds a write lease on argv[1] until its stdin ends (SIGIO, the kernel's notice that an
#: open waits for the lease, is ignored: the lease is kept).
_LEASE_HOLDER = """
import fcntl, os, signal, sys
signal.signal(signal.SIGIO, signal.SIG_IGN)
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
print("leased", flush=True)
sys.stdin.read()
"""


@contextmanager
def open_stalled(path: Path) -> Iterator[Callable[[], bool]]:
    """Every ``open`` of ``path`` waits (as on a hung mount) until the block ends; yields
    whether an ``open`` is waiting now (the kernel breaking the lease, in /proc/locks)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _LEASE_HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdin is not None
    assert holder.stdout.readline() == "leased\n"
    inode = f":{path.stat().st_ino} "

    def waiting() -> bool:
        with open("/proc/locks") as locks:
            return any("BREAKING" in line and inode in line for line in locks)

    try:
        yield waiting
    finally:
        holder.stdin.close()
        holder.wait()
