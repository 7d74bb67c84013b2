"""A federation on this machine: coordinator, selectors and clients as separate processes.

Every message crosses a real socket on 127.0.0.1. The demo runs one of these,
and so do the end-to-end tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..errors import ChildFailed
from .processes import Child
from .training import Hyper

__all__ = ["Endpoints", "LocalFederation"]


@dataclass(frozen=True)
class Endpoints:
    coordinator: str
    status_url: str
    selectors: tuple[str, ...]


@dataclass
class LocalFederation:
    """``root`` must already hold the problem (``initFiles/``); logs go to ``root/logs``.

    Client ``k`` trains on ``shards[k]`` and talks to selector ``k % selectors``.
    ``clip_norm`` > 0: clients clip their updates to it and upload them with weight 1,
    selectors refuse the uploads that do not (differential privacy).
    """

    root: Path
    selectors: int
    shards: Sequence[Path]
    rounds: int
    hyper: Hyper = field(default_factory=Hyper)
    problem_id: str = "local"
    report_timeout: float = 120.0
    coordinator_env: dict[str, str] = field(default_factory=dict)
    clip_norm: float = 0.0
    children: list[Child] = field(default_factory=list)

    def _child(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        child = Child(name, args, self.root / "logs" / f"{name}.log", env)
        self.children.append(child)
        return child

    @contextlib.asynccontextmanager
    async def running(
        self, before_clients: Callable[[Endpoints], Awaitable[None]] | None = None
    ) -> AsyncIterator[Endpoints]:
        """Start everything; stop everything (SIGTERM, then SIGKILL) on the way out.

        ``before_clients`` is awaited once the coordinator and the selectors
        serve, before any client starts: a status subscriber that has its first
        message there has seen the first round open (round 1 on a new problem;
        the stream shows the present, not what went before, and clients can
        reach the goal before a subscriber that connects after they start).
        What it leaves running must run in the caller's nursery: clients start
        when it returns. If it raises, the processes started are stopped and its
        error comes out in an ExceptionGroup.
        """
        try:
            async with trio.open_nursery() as nursery:
                endpoints = await self._start_servers(nursery)
                if before_clients is not None:
                    await before_clients(endpoints)
                await self._start_clients(nursery, endpoints.selectors)
                yield endpoints
                await self.stop()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.stop(grace=2)

    async def _start_servers(self, nursery: trio.Nursery) -> Endpoints:
        coordinator = self._child(
            "coordinator",
            ["fl_coordinator", "serve"],
            {
                "FL_ROOT_PATH": str(self.root),
                "HOST": "127.0.0.1",
                "PORT": "0",
                "STATUS_PORT": "0",
                "CHECKIN_LIMIT": str(len(self.shards)),
                "PROBLEM_ID": self.problem_id,
                "LOG_LEVEL": "INFO",
                **self.coordinator_env,
            },
        )
        ready = await coordinator.start(
            nursery, r"selectors at (\S+:\d+) \(FlIntra\), status stream at (\S+),"
        )
        address, status_url = ready.group(1), ready.group(2)
        selector_ids = []
        for index in range(self.selectors):
            selector = self._child(
                f"selector{index}",
                [
                    "fl_coordinator.federation.selector_cli", "serve",
                    "--coordinator", address, "--root", str(self.root), "--port", "0",
                    "--waiting-time-ms", "200", "--hold-timeout", "120",
                    "--report-timeout", str(self.report_timeout),
                    "--clip-norm", str(self.clip_norm),
                ],
            )  # fmt: skip
            selector_ids.append((await selector.start(nursery, r"selector (\S+) serving")).group(1))
        return Endpoints(address, status_url, tuple(selector_ids))

    async def _start_clients(self, nursery: trio.Nursery, selector_ids: Sequence[str]) -> None:
        for index, shard in enumerate(self.shards):
            client = self._child(
                f"client{index}",
                [
                    "fl_coordinator.federation.client_cli",
                    "--selector", selector_ids[index % len(selector_ids)],
                    "--data", str(shard),
                    "--work-dir", str(self.root / "clients" / f"work{index}"),
                    "--rounds", str(self.rounds), "--epochs", str(self.hyper.epochs),
                    "--batch-size", str(self.hyper.batch_size),
                    "--learning-rate", str(self.hyper.learning_rate),
                    "--momentum", str(self.hyper.momentum),
                    "--clip-norm", str(self.clip_norm),
                    "--max-refusals", "1000",
                ],
            )  # fmt: skip
            await client.start(nursery, r"client of \S+ with \d+ samples")

    def check_children(self) -> None:
        """Raise ChildFailed if any process ended with an error."""
        for child in self.children:
            if child.returncode not in (None, 0):
                raise ChildFailed(
                    f"{child.name} exited with status {child.returncode}:\n{child.tail()}"
                )

    async def wait_for_clients(self) -> None:
        """Clients exit by themselves after their last round."""
        for child in self.children:
            if child.name.startswith("client"):
                await child.wait()

    async def stop(self, grace: float = 10.0) -> None:
        for child in reversed(self.children):
            await child.stop(grace)
