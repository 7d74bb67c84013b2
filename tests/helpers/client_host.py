"""The clients' host of a test federation: clients and a status subscriber in one process.

Run on a host of its own (``python -m helpers.client_host STATUS_URL WORK_DIR``
behind ``ip netns exec``), it follows the coordinator's status stream and runs
clients when told, one JSON object per line both ways:

- on stdin, ``{"round": r, "clients": [{"selector", "update", "weight", "hold"}, ...]}``
  starts one client per entry: it checks in with the reference client's calls
  (retrying when refused), downloads ``initFiles/``, and uploads ``update`` (a real
  Keras-written file) with weight ``n``: at once, or, if ``hold``, when
  ``{"release": r}`` arrives. No training: the clients are quick to start.
- on stdout, ``{"status": message}`` for each status message, and
  ``{"client": i, "round": r, "event": "configured" | "uploaded" | "upload_failed"}``.

:class:`ClientHost` is the test's side: it starts the program, sends it lines,
and waits for what it printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from fl_coordinator.federation.client import SelectorCalls
from helpers.arrivals import Arrivals

__all__ = ["ClientHost", "main"]

#: How long a held client's upload may take once released (a cut link never answers).
UPLOAD_LIMIT = 10.0
#: Longest wait between two check-ins of a refused client.
RETRY_LIMIT = 0.5
#: The folder that holds the helpers package, for the program's PYTHONPATH.
_TESTS = Path(__file__).resolve().parents[1]


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def _take_part(index: int, round_no: int, spec: dict, work: Path, release: trio.Event):
    client = SelectorCalls(spec["selector"], work / f"client{index}-round{round_no}")
    async with trio.open_nursery() as nursery:
        client.connect(nursery)
        # Refused: wait the selector's reconnection time, then check in again (the protocol).
        while (refused_ms := await client.check_in()) is not None:  # noqa: ASYNC110
            await trio.sleep(min(refused_ms / 1000, RETRY_LIMIT))
        _emit(client=index, round=round_no, event="configured")
        if spec["hold"]:
            await release.wait()
        try:
            with trio.fail_after(UPLOAD_LIMIT):
                await client.upload(Path(spec["update"]), spec["weight"])
        except Exception as error:  # the point: it cannot reach its selector
            _emit(client=index, round=round_no, event="upload_failed", error=repr(error)[:300])
        else:
            _emit(client=index, round=round_no, event="uploaded")
        nursery.cancel_scope.cancel()


async def _follow(url: str) -> None:
    async with trio_websocket.open_websocket_url(url) as ws:
        while True:
            _emit(status=json.loads(await ws.get_message()))


async def _commands(nursery: trio.Nursery, work: Path) -> None:
    releases: dict[int, trio.Event] = {}
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    while chunk := await stdin.receive_some():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            command = json.loads(line)
            release = releases.setdefault(command["round"], trio.Event())
            if "release" in command:
                release.set()
            for index, spec in enumerate(command.get("clients", [])):
                nursery.start_soon(_take_part, index, command["round"], spec, work, release)
    nursery.cancel_scope.cancel()  # stdin closed: the test is over


async def _run(url: str, work: Path) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_follow, url)
        nursery.start_soon(_commands, nursery, work)


def main(argv: Sequence[str] | None = None) -> None:
    url, work = argv or sys.argv[1:]
    trio.run(_run, url, Path(work))


class ClientHost:
    """The test's handle on a running client host: send commands, wait for its lines."""

    def __init__(self) -> None:
        self._arrivals: Arrivals[dict[str, Any]] = Arrivals()
        self.process: trio.Process | None = None

    @property
    def lines(self) -> list[dict[str, Any]]:
        return self._arrivals.items

    async def run(self, prefix: list[str], url: str, work: Path, log: Path,
                  *, task_status: trio.TaskStatus[None]) -> None:  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(_TESTS)}
        with open(log, "wb") as stderr:  # noqa: ASYNC230 (opened once, before the loop)
            self.process = await trio.lowlevel.open_process(
                [*prefix, sys.executable, "-m", "helpers.client_host", url, str(work)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env,
            )  # fmt: skip
            task_status.started()
            assert self.process.stdout is not None
            buffer = b""
            while chunk := await self.process.stdout.receive_some():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._arrivals.add(json.loads(line))
            await self.process.wait()
            self._arrivals.end()

    async def send(self, **command: Any) -> None:
        assert self.process is not None and self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(command).encode() + b"\n")

    async def close(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            await self.process.stdin.aclose()

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first line (already printed or future) that satisfies ``predicate``."""
        return await self._arrivals.wait_for(predicate, "the client host")

    async def wait_for_status(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first status message that satisfies ``predicate``."""
        line = await self.wait_for(lambda line: "status" in line and predicate(line["status"]))
        return line["status"]

    async def wait_for_outcome(self, client: int, round_no: int) -> str:
        """``uploaded`` or ``upload_failed``, once client ``client`` of ``round_no`` knows."""
        line = await self.wait_for(
            lambda line: (
                (line.get("client"), line.get("round")) == (client, round_no)
                and line["event"] != "configured"
            )
        )
        return line["event"]

    def statuses(self) -> list[dict[str, Any]]:
        return [line["status"] for line in self.lines if "status" in line]

    def events(self, round_no: int, event: str) -> list[int]:
        return sorted(line["client"] for line in self.lines
                      if line.get("round") == round_no and line.get("event") == event)  # fmt: skip


if __name__ == "__main__":
    main()
