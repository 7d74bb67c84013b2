"""The ``fl-coordinator`` command as an operator runs it: subprocesses and their log lines."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

COMMAND = [sys.executable, "-m", "fl_coordinator"]

#: The line ``serve`` logs once it listens: the gRPC port and the status URL.
READY = r"selectors at \S+:(\d+) \(FlIntra\), status stream at (\S+),"


def environment(root: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "STATUS_PORT", "HOST")}
    env.update(FL_ROOT_PATH=str(root), HOST="127.0.0.1", PORT="0", STATUS_PORT="0")
    env.update(values)
    return env


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(COMMAND + args, env=env, capture_output=True, text=True, timeout=120)


class Served:
    """A ``serve`` process whose log lines are read by a thread into a queue.

    ``args``: the whole command line, if not ``fl-coordinator serve``; ``open_files``
    runs it under ``prlimit --nofile=N`` (soft and hard limit).
    """

    def __init__(
        self, env: dict[str, str], args: list[str] | None = None, *, open_files: int | None = None
    ) -> None:
        limit = ["prlimit", f"--nofile={open_files}", "--"] if open_files else []
        self.process = subprocess.Popen(
            [*limit, *(args or [*COMMAND, "serve"])], env=env, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_line(self, text: str, limit: float = 120) -> str:
        deadline = time.monotonic() + limit
        while (line := self._queue.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"serve ended without logging {text!r}:\n{''.join(self.lines)}")

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Kill it if it is still running (a test that failed half-way)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def ready(self) -> tuple[int, str]:
        """Wait until it listens: its gRPC port and status URL."""
        found = re.search(READY, self.wait_for_line("status stream at"))
        assert found, self.lines[-1]
        return int(found.group(1)), found.group(2)

    def open_files(self) -> int:
        """Descriptors the process holds now."""
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def rss_kib(self) -> int:
        """Resident memory of the process, in KiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]

    def rest(self) -> str:
        while (line := self._queue.get(timeout=30)) is not None:
            self.lines.append(line)
        return "".join(self.lines)


def wait_until(condition: Callable[[], bool], limit: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or ``limit`` seconds passed (False)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
