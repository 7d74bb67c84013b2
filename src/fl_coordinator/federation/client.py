"""The reference client: check in, download, train locally, upload ``n * (w_new - w)`` and ``n``.

When a selector refuses it (one ``FL_INT`` message: the reconnection time in
ms) it waits that long and tries again, at most ``max_refusals`` times per
round, so a client never spins forever against a full federation.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import purerpc
import trio

from .._proto import fl_round_grpc, fl_round_pb2
from ..errors import GaveUp
from ..rpc.addresses import split_address
from .training import Hyper, Trainer
from .transfer import file_chunks, integer, safe_name

__all__ = ["Client", "ClientOptions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientOptions:
    selector: str
    data: Path
    work_dir: Path
    hyper: Hyper = field(default_factory=Hyper)
    rounds: int = 1
    max_refusals: int = 100
    max_wait_s: float = 60.0  # cap on a selector's reconnection time


def _load_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["x"].astype(np.float32), data["y"].astype(np.int64)


async def _upload_messages(path: Path, n: int) -> AsyncIterator[fl_round_pb2.FlData]:
    async with aclosing(file_chunks(path)) as chunks:
        async for chunk in chunks:
            yield chunk
    yield integer(n)


class Client:
    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self.x, self.y = _load_shard(options.data)
        self.trainer = Trainer(options.hyper)
        self.files = options.work_dir / "files"
        self.update = options.work_dir / "update"
        self.rounds_done = 0

    async def check_in(self) -> int | None:
        """One CheckIn: download the files into ``self.files`` and return None, or, when
        refused, return the selector's reconnection time in ms.

        Nothing is raised inside the channel: purerpc's channel is a task group,
        which would wrap our exceptions in exception groups.
        """
        host, port = split_address(self.options.selector)
        self.files.mkdir(parents=True, exist_ok=True)
        received: set[str] = set()
        refused_ms: int | None = None
        async with purerpc.insecure_channel(host, port) as channel:
            # The raw stream, not the async-generator stub: leaving a generator
            # that holds a task group open (as on refusal) corrupts trio's scopes.
            stream = await fl_round_grpc.FlRoundStub(channel).CheckIn()
            await stream.send_message(fl_round_pb2.CheckInRequest(message="check in"))
            await stream.close()
            current: trio.abc.AsyncResource | None = None
            while (message := await stream.receive_message()) is not None:
                if message.type == fl_round_pb2.FL_INT:
                    refused_ms = message.intVal
                    continue
                name = safe_name(message.filePath)
                if name not in received:
                    if current is not None:
                        await current.aclose()
                    received.add(name)
                    current = await trio.open_file(self.files / name, "wb")
                await current.write(message.chunk)  # type: ignore[union-attr]
            if current is not None:
                await current.aclose()
        if refused_ms is not None:
            return refused_ms
        missing = {"model.h5", "fl_checkpoint"} - received
        if missing:
            raise ConnectionError(f"selector sent no {', '.join(sorted(missing))}")
        return None

    async def upload(self, n: int) -> None:
        host, port = split_address(self.options.selector)
        async with purerpc.insecure_channel(host, port) as channel:
            stub = fl_round_grpc.FlRoundStub(channel)
            await stub.Update(_upload_messages(self.update, n))

    async def participate(self) -> None:
        """Check in until accepted (bounded), train, upload."""
        for refusal in range(self.options.max_refusals + 1):
            refused_ms = await self.check_in()
            if refused_ms is None:
                break
            wait = min(refused_ms / 1000, self.options.max_wait_s)
            log.debug("refused (%d); retrying in %.1f s", refusal + 1, wait)
            await trio.sleep(wait)
        else:
            raise GaveUp(
                f"refused {self.options.max_refusals + 1} times by {self.options.selector}"
            )
        n = await trio.to_thread.run_sync(
            self.trainer.train,
            self.files / "model.h5",
            self.files / "fl_checkpoint",
            self.x,
            self.y,
            self.update,
        )
        await self.upload(n)
        self.rounds_done += 1
        log.info(
            "round done (%d/%d): uploaded update with n=%d",
            self.rounds_done,
            self.options.rounds,
            n,
        )

    async def run(self) -> None:
        for _ in range(self.options.rounds):
            await self.participate()
