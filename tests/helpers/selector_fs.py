"""A selector's own file system (FUSE) that answers any errno it likes.

The selectors' folders may live on storage that a selector's party serves
(a FUSE or network file system): its server, not the kernel, chooses the
errno of each call, EMFILE ("too many open files") included. This helper
mounts such a file system over a folder: a read-only view of another
folder (``backing``), where one operation on one file answers ``errno``
from its ``after``-th call on (counted from 1; the calls before it are
served from ``backing``): ``open``, ``read``, ``getattr`` (what the
kernel asks for a ``stat``, an ``fstat`` or a lookup of the name) or
``flush`` (what it asks at each ``close`` of the file, and returns from it). Nothing
is cached by the kernel: every call reaches the server. Instead of an errno,
:data:`HANG`: the call gets no answer (a hung mount) until ``gate`` is
removed. With a ``gate`` (a file), the fault holds only while it exists: a
test opens it once the files have passed their check, say.

Run in its own process (``python selector_fs.py BACKING MOUNT FILE OP ERRNO
AFTER [GATE]``), it prints a line once the kernel has mounted it; :func:`mounted`
does that and unmounts it at the end. :meth:`Mount.arm` gives a mounted one
another operation, errno and ``after``, its count started again: a test that
tries every N in turn mounts once, not once per N. Needs /dev/fuse, libfuse 3 and
``fusermount3`` (Linux; root, as the tests run in CI): tests that mount one
are marked :data:`needs_fuse`, and are skipped, loudly (see
``tests/conftest.py``), where those are missing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["HANG", "HOW_TO_GET_FUSE", "Mount", "mounted", "needs_fuse"]

#: Not an errno: the call is not answered while the gate exists.
HANG = -1

#: How to get the FUSE tests where they cannot run.
HOW_TO_GET_FUSE = "apt-get install -y fuse3 (Debian's package; .ci/run does it), and /dev/fuse"

#: A test that mounts a selector's file system: marked ``fuse``, skipped where it cannot.
needs_fuse = pytest.mark.skipif(
    not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")),
    reason="FUSE test not run: /dev/fuse or fusermount3 is missing; "
    f"get them with {HOW_TO_GET_FUSE}",
)

_READY, _HELD, _ARMED = "mounted", "held", "armed"


#: Longest wait for a line of the server (it mounts, it holds a call), in seconds.
_PATIENCE = 60.0


@dataclass
class Mount:
    """A mounted file system of :func:`mounted`: the lines its server says, one by one."""

    _server: subprocess.Popen[bytes]
    _pending: bytes = b""

    def said(self, expected: str) -> None:
        """Return once the server's next line is ``expected``; AssertionError if it says
        another, or nothing within _PATIENCE (blocks: call it in a thread from async code)."""
        assert self._server.stdout is not None
        fd = self._server.stdout.fileno()
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], _PATIENCE)
            assert ready, f"the FUSE server did not say {expected!r} within {_PATIENCE:g} s"
            chunk = os.read(fd, 4096)
            assert chunk, f"the FUSE server ended before it said {expected!r}"
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        assert line.decode() == expected, f"the FUSE server said {line!r}, not {expected!r}"

    def held(self) -> None:
        """Return once a call has been held (:data:`HANG`): the next one not yet held."""
        self.said(_HELD)

    def arm(self, operation: str, code: int, after: int = 1) -> None:
        """From now on ``operation`` answers ``code`` (an errno) from its ``after``-th call
        on, counted from here; returns once the server has taken it (blocks)."""
        assert self._server.stdin is not None and code != HANG
        self._server.stdin.write(f"{operation} {errno.errorcode[code]} {after}\n".encode())
        self._server.stdin.flush()
        self.said(_ARMED)


@contextlib.contextmanager
def mounted(
    backing: Path,
    mount: Path,
    file: str,
    operation: str,
    code: int,
    after: int = 1,
    gate: Path | None = None,
) -> Iterator[Mount]:
    """``mount`` shows ``backing``, but ``operation`` on ``mount/file`` answers ``code``
    (an errno, or :data:`HANG`) from its ``after``-th call on, until the context ends
    (with a ``gate``: while that file exists; it is removed at the end)."""
    assert code != HANG or gate is not None, "a HANG needs a gate to end it"
    mount.mkdir(exist_ok=True)
    name = "HANG" if code == HANG else errno.errorcode[code]
    args = [str(backing), str(mount), file, operation, name, str(after), str(gate or "")]
    with subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as server:
        try:
            mounted_fs = Mount(server)
            mounted_fs.said(_READY)  # the kernel's INIT reached the server
            yield mounted_fs
        finally:
            if gate is not None:
                gate.unlink(missing_ok=True)  # calls left hanging are answered
            subprocess.run(["fusermount3", "-u", "-z", str(mount)], check=False)
            # Detached (lazily), the mount ends when nothing refers to it any more: a
            # descriptor on it that the test's process has not collected yet keeps the
            # server waiting (seen over 30 s on a loaded machine). Nothing is asked of
            # it after this point: it is stopped, and such a descriptor reads ENOTCONN.
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _serve(
    backing: str, mount: str, file: str, operation: str, name: str, after: int, gate: str
) -> None:
    import threading
    import time

    import mfusepy as fuse  # only in the server's process

    target = f"/{file}"
    fault = {"operation": operation, "code": HANG if name == "HANG" else getattr(errno, name),
             "after": after, "n": 0}  # fmt: skip
    counting = threading.Lock()  # the server answers calls in several threads

    def say(line: str) -> None:
        os.write(1, f"{line}\n".encode())  # one write: lines of two threads never mix

    def rearm() -> None:  # Mount.arm's lines, one by one, until the test closes stdin
        for line in sys.stdin:
            op, errno_name, from_call = line.split()
            with counting:
                fault.update(operation=op, code=getattr(errno, errno_name),
                             after=int(from_call), n=0)  # fmt: skip
            say(_ARMED)

    def answer(path: str, op: str) -> None:
        with counting:
            if path != target or op != fault["operation"]:
                return
            fault["n"] += 1
            counted, code, first = fault["n"], fault["code"], fault["after"]
        if counted < first or (gate and not os.path.exists(gate)):
            return
        if code != HANG:
            raise fuse.FuseOSError(code)
        say(_HELD)  # see Mount.held
        while os.path.exists(gate):  # no answer: what a hung mount gives (a fake of one)
            time.sleep(0.01)

    class View(fuse.Operations):
        use_ns = True

        def init(self, path: str) -> None:
            say(_READY)

        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            answer(path, "getattr")
            found = os.lstat(backing + path)
            keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime", "st_mtime",
                    "st_ctime")  # fmt: skip
            times = {"st_atime": found.st_atime_ns, "st_mtime": found.st_mtime_ns,
                     "st_ctime": found.st_ctime_ns}  # fmt: skip
            return {key: times.get(key, getattr(found, key, 0)) for key in keys}

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(backing + path)]

        def open(self, path: str, flags: int) -> int:
            answer(path, "open")
            return os.open(backing + path, os.O_RDONLY)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            answer(path, "read")
            return os.pread(fh, size, offset)

        def flush(self, path: str, fh: int) -> int:
            answer(path, "flush")  # what a close(2) of the file returns
            return 0

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

    threading.Thread(target=rearm, daemon=True).start()
    fuse.FUSE(View(), mount, foreground=True, allow_other=True, ro=True, direct_io=True,
              attr_timeout=0, entry_timeout=0)  # fmt: skip


if __name__ == "__main__":
    _serve(*sys.argv[1:6], int(sys.argv[6]), sys.argv[7] if len(sys.argv) > 7 else "")
