"""Command lines as an operator types them, each run by ``sh`` on a host of its own.

A :class:`Shell` says where a line runs: the host (a network namespace of
helpers/netns.py, whose ``/etc/hosts`` names the others), the folder it runs
in, what is mounted where in that host's own mount namespace (the README's
``/shared/digits``, ``/run/secrets``, a pod's ``/data``), and optionally the
host name and user of a Kubernetes pod. The line itself goes to ``sh -c``
unchanged (``sh`` is dash on Debian: POSIX only), with the commands of this
checkout's ``.venv`` first on ``PATH``, as after ``pip install``.

A :class:`Program` is one such line running: its output (stdout and stderr)
is kept line by line, copied to a log file, and waited on (:meth:`Program.line`)
instead of slept for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import REPO
from .arrivals import Arrivals
from .netns import Host

__all__ = ["WATCHED", "Operator", "Program", "Shell", "mount_point", "stage_for", "watched"]

#: The commands of this checkout (fl-coordinator, fl-selector, fl-client), then the system's.
PATH = f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: What every line needs to see where it is on this machine, whatever a host mounts over it
#: (a pod's emptyDir at /tmp hides a checkout cloned under /tmp): the checkout, with its
#: editable install's sources, and the environment its commands run from.
_OWN = tuple(sorted({REPO, Path(sys.prefix)}))
#: Where the folders to mount may wait, in a tmpfs of the host's own, while others are
#: covered: the first that exists and neither holds nor lies in a folder mounted or bound.
_STAGES = ("/mnt", "/media", "/srv", "/opt", "/var/opt")


def _related(one: Path, other: Path) -> bool:
    return one == other or one in other.parents or other in one.parents


def stage_for(paths: list[Path]) -> str:
    """A folder to stage mounts in that covers none of ``paths`` and is covered by none."""
    for candidate in map(Path, _STAGES):
        if candidate.is_dir() and not any(_related(candidate, path) for path in paths):
            return str(candidate)
    raise RuntimeError(f"no folder among {_STAGES} to stage mounts in, apart from {paths}")


_LOCKS = Path("/run/lock")


@contextmanager
def mount_point(path: Path) -> Iterator[Path]:
    """An empty top-level folder ``path`` (``/shared``, ``/data``) for hosts to mount on.

    Mounts are made only in the hosts' own mount namespaces, so nothing ever
    appears in it on this machine. It is made if missing and removed by the last
    test run using it: runs side by side (other checkouts) hold a shared lock
    while they use it, and removing a folder another run has mounted on would
    unmount theirs. A folder that was there before any test made it is left alone.
    """
    tag = str(path).strip("/").replace("/", "-")
    made = _LOCKS / f"fl-coordinator-tests-{tag}.made"
    with open(_LOCKS / f"fl-coordinator-tests-{tag}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            path.mkdir()
            made.touch()
        fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            yield path
        finally:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another run still uses it: the last one removes it
            else:
                if made.exists() and not any(path.iterdir()):
                    path.rmdir()
                    made.unlink()


@dataclass(frozen=True)
class Shell:
    """Where and as whom a line runs.

    ``binds``: folder on the host -> folder of this machine mounted there;
    ``empty``: folders covered by an empty tmpfs first (``/run``, to make
    ``/run/secrets`` without touching this machine's ``/run``); ``hostname``: a
    UTS namespace with that name (a pod's); ``user``: uid and gid to run as (not 0),
    with one capability kept, CAP_DAC_READ_SEARCH, so that it can read this
    checkout's Python wherever it lives (under ``/root``, with pyenv): what it may
    write is still only what the user may.
    """

    host: Host
    cwd: Path
    binds: dict[str, Path] = field(default_factory=dict)
    empty: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    hostname: str | None = None
    user: int | None = None

    def argv(self, line: str) -> list[str]:
        # Every source is bound into the stage first, before a mount can hide it, then
        # onto its target; last, this checkout is bound back where it was.
        targets = [*self.binds, *map(str, _OWN)]
        sources = [*self.binds.values(), *_OWN]
        stage = stage_for([*sources, *map(Path, targets), *map(Path, self.empty), self.cwd])
        setup = ["set -e", f"mount -t tmpfs -o mode=755 fl-stage {stage}"]
        for index, source in enumerate(sources):
            setup.append(f"mkdir {stage}/{index}")
            setup.append(f"mount --bind {shlex.quote(str(source))} {stage}/{index}")
        setup += [f"mount -t tmpfs -o mode=755 fl-empty {shlex.quote(path)}" for path in self.empty]
        for index, target in enumerate(targets):
            setup.append(f"mkdir -p {shlex.quote(target)}")
            setup.append(f"mount --bind {stage}/{index} {shlex.quote(target)}")
        if self.hostname:
            setup.append(f"hostname {shlex.quote(self.hostname)}")
        setup.append(f"cd {shlex.quote(str(self.cwd))}")
        become = ""
        if self.user:  # keeps CAP_DAC_READ_SEARCH only: this checkout's Python may be under /root
            become = (f"setpriv --reuid {self.user} --regid {self.user} --clear-groups "
                      "--inh-caps +dac_read_search --ambient-caps +dac_read_search ")  # fmt: skip
        setup.append(f'exec {become}sh -c "$1"')
        uts = ["unshare", "--uts"] if self.hostname else []
        return [*self.host.prefix, *uts, "sh", "-c", "\n".join(setup), "sh", line]

    def environment(self) -> dict[str, str]:
        return {"PATH": PATH, "HOME": str(self.cwd), "LANG": "C.UTF-8", **self.env}


class Program:
    """One line running under a :class:`Shell`; its output in ``log`` and in :attr:`lines`."""

    def __init__(self, shell: Shell, line: str, log: Path) -> None:
        self.shell = shell
        self.line_run = line
        self.log = log
        self._lines: Arrivals[str] = Arrivals()
        self.process: trio.Process | None = None
        self.returncode: int | None = None

    @property
    def lines(self) -> list[str]:
        return self._lines.items

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start it and copy its output until it ends (run it in a nursery)."""
        self.process = await trio.lowlevel.open_process(
            self.shell.argv(self.line_run),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.shell.environment(),
            start_new_session=True,  # its own process group: stop() reaches what it started
        )
        task_status.started()
        try:
            await self._copy_output()
            self.returncode = await self.process.wait()
        finally:
            if self.returncode is None:  # cancelled (a failed test): nothing may outlive it
                os.killpg(self.process.pid, signal.SIGKILL)
            self._lines.end()

    async def _copy_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        buffer = b""
        with open(self.log, "ab") as log:  # noqa: ASYNC230 (small, local, line by line)
            log.write(f"$ {self.line_run}\n".encode())
            while chunk := await self.process.stdout.receive_some(65536):
                log.write(chunk)
                log.flush()
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for line in complete:
                    self._lines.add(line.decode(errors="replace"))

    async def line(self, pattern: str) -> re.Match[str]:
        """The match of regex ``pattern`` in the first output line that has one."""
        compiled = re.compile(pattern)
        try:
            found = await self._lines.wait_for(lambda line: compiled.search(line) is not None, "")
        except AssertionError:
            raise AssertionError(
                f"`{self.line_run}` ended (status {self.returncode}) without a line matching "
                f"{pattern!r}:\n{self.tail()}"
            ) from None
        match = compiled.search(found)
        assert match is not None
        return match

    async def wait(self) -> int:
        """Its exit status, once it has ended and its output is all read."""
        with contextlib.suppress(AssertionError):  # raised when the output ends
            await self._lines.wait_for(lambda _: False, "")
        assert self.returncode is not None
        return self.returncode

    def tail(self, count: int = 20) -> str:
        return "\n".join(self.lines[-count:])

    def stop(self) -> None:
        """SIGTERM to what the line started, as ``kill PID`` or a pod's stop would send it.

        The line's ``sh`` (dash forks even for one command) passes the program's exit
        status on; the rest of the process group (a coordinator's worker processes)
        is left to the program, as it would be outside a terminal.
        """
        if self.process is not None and self.returncode is None:
            for child in _children(self.process.pid):
                os.kill(child, signal.SIGTERM)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


#: A line of ``fl-coordinator watch --plain``: round, stage, clients accepted/goal,
#: selectors, configured, reported.
WATCHED = (
    r"round (\d+)\s+(\w+)\s+clients (\d+)/(\d+)\s+selectors (\d+)\s+configured (\d+)"
    r"\s+reported (\d+)"
)


def watched(program: Program) -> list[tuple[int, str]]:
    """(round, stage) of the watch lines so far, consecutive repeats collapsed."""
    sequence: list[tuple[int, str]] = []
    for line in program.lines:
        found = re.search(WATCHED, line)
        if found and (not sequence or sequence[-1] != (int(found[1]), found[2])):
            sequence.append((int(found[1]), found[2]))
    return sequence


class Operator:
    """The programs of one walkthrough, by name, run in ``nursery``, logs in ``logs``."""

    def __init__(self, nursery: trio.Nursery, logs: Path) -> None:
        self.nursery = nursery
        self.logs = logs
        self.programs: dict[str, Program] = {}
        logs.mkdir(parents=True, exist_ok=True)

    async def start(self, name: str, shell: Shell, line: str, ready: str | None = None) -> Program:
        """Start ``line``; with ``ready``, return once a line of its output matches it."""
        program = Program(shell, line, self.logs / f"{name}.log")
        self.programs[name] = program
        await self.nursery.start(program.run)
        if ready is not None:
            await program.line(ready)
        return program

    async def run(self, name: str, shell: Shell, line: str) -> Program:
        """Run ``line`` to its end; its exit status must be 0."""
        program = await self.start(name, shell, line)
        status = await program.wait()
        assert status == 0, f"`{line}` exited with {status}:\n{program.tail()}"
        return program

    async def stop(self, name: str) -> int:
        """Stop it (SIGTERM) and return its exit status."""
        program = self.programs[name]
        program.stop()
        return await program.wait()

    async def stop_all(self) -> None:
        for program in reversed(list(self.programs.values())):
            program.stop()
            await program.wait()
