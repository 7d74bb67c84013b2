"""Child processes of the demo: started, watched through their logs, stopped with SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from ..errors import ChildFailed

__all__ = ["Child"]


class Child:
    """One program of the federation, its stderr copied to ``log_path`` line by line.

    ``args`` follow ``python -m``; ``prefix`` is a command that runs it elsewhere,
    such as ``ip netns exec HOST`` (another network namespace), and must exec it.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.args = [*prefix, sys.executable, "-m", *args]
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: trio.Process | None = None
        self._ready: re.Match[str] | None = None
        self._ready_event = trio.Event()

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def start(self, nursery: trio.Nursery, ready: str) -> re.Match[str]:
        """Start the process; return the match of regex ``ready`` in its log once it appears."""
        pattern = re.compile(ready)
        self.process = await trio.lowlevel.open_process(
            self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=self.env
        )
        nursery.start_soon(self._pump, pattern)
        with trio.fail_after(120):
            await self._ready_event.wait()
        if self._ready is None:
            raise ChildFailed(f"{self.name} exited before it was ready:\n{self.tail()}")
        return self._ready

    async def _pump(self, pattern: re.Pattern[str]) -> None:
        assert self.process is not None and self.process.stderr is not None
        buffer = b""
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 (small, local, line by line)
            while chunk := await self.process.stderr.receive_some(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    log.write(line + b"\n")
                    if self._ready is None:
                        self._ready = pattern.search(line.decode(errors="replace"))
                        if self._ready is not None:
                            self._ready_event.set()
                log.flush()
        self._ready_event.set()  # end of its output: it will not become ready now

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not ended within ``grace`` seconds."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await self.wait()
            return
        self.process.kill()
        await self.wait()
