"""The reference client: check in, download, train locally, upload ``n * (w_new - w)`` and ``n``.

When a selector refuses it (one ``FL_INT`` message: the reconnection time in
ms) it waits that long and tries again, at most ``max_refusals`` times per
round, so a client never spins forever against a full federation.

Its data is checked before it takes a place in a round: the ``.npz`` must
hold ``x`` (samples, features...) and integer labels ``y``, and, once the
client knows the model (``--model``, or the one a previous round sent), ``x``
must fit the model's input and ``y`` its classes. The first round without
``--model`` can only check after the download, before training. A selector
it cannot use (nothing listening, another kind of port, TLS) is one line
(:class:`~fl_coordinator.errors.PeerError`), not a traceback.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio
from purerpc.grpclib.events import ResponseEnded
from purerpc.grpclib.exceptions import raise_status

from .._proto import fl_round_grpc, fl_round_pb2
from ..errors import ConfigError, GaveUp, PeerError
from .call_errors import explain, is_mistake
from .link import GrpcLink
from .training import Hyper, Trainer
from .transfer import file_chunks, integer, safe_name

__all__ = ["Client", "ClientOptions", "SelectorCalls", "load_shard"]

log = logging.getLogger(__name__)

#: What a client needs from the selector to train.
_NEEDED = ("fl_checkpoint", "model.h5")
_PORT_HINT = "clients call a selector's port, fl-selector --port, 50051 by default"


@dataclass(frozen=True)
class ClientOptions:
    selector: str
    data: Path
    work_dir: Path
    hyper: Hyper = field(default_factory=Hyper)
    rounds: int = 1
    max_refusals: int = 100
    max_wait_s: float = 60.0  # cap on a selector's reconnection time
    tls: ssl.SSLContext | None = None  # dial the selector over TLS (trusting its CA)
    model: Path | None = None  # the problem's model, to check the data before the first round
    clip_norm: float = 0.0  # differential privacy: upload w_i - w clipped to this, weight 1


def load_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (float32) and ``y`` (int64) of an ``.npz`` file; ConfigError names what is wrong."""

    def refuse(expected: str) -> ConfigError:
        return ConfigError("--data", str(path), expected)

    try:
        with open(path, "rb") as file:
            if file.read(4) != b"PK\x03\x04":
                raise refuse("an .npz file written by numpy.savez (this is not one: no zip header)")
        with np.load(path, allow_pickle=False) as data:
            names = sorted(data.files)
            if "x" not in names or "y" not in names:
                raise refuse(f"arrays named x and y (it has: {', '.join(names) or 'none'})")
            x, y = data["x"], data["y"]
    except (OSError, ValueError, EOFError) as error:
        raise refuse(f"an .npz file written by numpy.savez ({error})") from None
    if x.ndim < 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise refuse(f"x of numbers, one row per sample (x is {x.dtype} of shape {x.shape})")
    if y.ndim != 1 or len(y) != len(x) or len(x) == 0:
        raise refuse(f"y with one label per row of x (x: {len(x)} rows, y: shape {y.shape})")
    if not np.issubdtype(y.dtype, np.integer):
        raise refuse(f"integer class labels in y (y is {y.dtype})")
    if not np.isfinite(x).all():
        raise refuse("finite values in x (it has NaN or infinity)")
    return x.astype(np.float32), y.astype(np.int64)


async def _upload_messages(path: Path, n: int) -> AsyncIterator[fl_round_pb2.FlData]:
    async with aclosing(file_chunks(path)) as chunks:
        async for chunk in chunks:
            yield chunk
    yield integer(n)


class SelectorCalls:
    """The client's two calls to its selector, over a :class:`GrpcLink` opened by
    :meth:`connect`: ``CheckIn`` (download ``initFiles/`` into ``files``) and ``Update``."""

    def __init__(self, selector: str, files: Path, tls: ssl.SSLContext | None = None) -> None:
        self.selector = selector
        self.files = files
        self._tls = tls
        self._link: GrpcLink | None = None

    def connect(self, nursery: trio.Nursery) -> None:
        """Calls to the selector from now on go over a link run in ``nursery``."""
        self._link = GrpcLink(nursery, self.selector, self._tls, peer="selector")

    async def _call(self, invoke: Any) -> Any:
        """``invoke(channel)`` on the link; a failure is a PeerError (one line)."""
        assert self._link is not None, "connect() first"
        try:
            return await self._link.call(invoke)
        except Exception as error:
            tls_hint = "" if self._tls else "if it serves TLS, give the client --selector-ca"
            reason = explain(error, self.selector, "selector", _PORT_HINT, tls_hint)
            raise PeerError(reason, 2 if is_mistake(error) else 1) from None

    async def check_in(self) -> int | None:
        """One CheckIn: download the files into ``files`` and return None, or, when
        refused, return the selector's reconnection time in ms."""
        self.files.mkdir(parents=True, exist_ok=True)
        received: set[str] = set()
        refused_ms: int | None = None

        async def exchange(channel: Any) -> None:
            nonlocal refused_ms
            # The raw stream, not the async-generator stub: leaving a generator
            # that holds a task group open (as on refusal) corrupts trio's scopes.
            stream = await fl_round_grpc.FlRoundStub(channel).CheckIn()
            await stream.send_message(fl_round_pb2.CheckInRequest(message="check in"))
            await stream.close()
            current: trio.abc.AsyncResource | None = None
            try:
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
            finally:
                if current is not None:
                    await current.aclose()
            ended = stream.end_stream_event
            if isinstance(ended, ResponseEnded):
                raise_status(ended.status)  # an error status (OK raises nothing)

        await self._call(exchange)
        if refused_ms is not None:
            return refused_ms
        missing = sorted(set(_NEEDED) - received)
        if missing:
            raise PeerError(
                f"the selector at {self.selector} sent no {' and no '.join(missing)} "
                "(is its folder the problem's, and initialised?)",
                1,
            )
        return None

    async def upload(self, update: Path, n: int) -> None:
        """Send the update file ``update`` with its weight ``n``."""

        async def send(channel: Any) -> None:
            await fl_round_grpc.FlRoundStub(channel).Update(_upload_messages(update, n))

        await self._call(send)


class Client:
    """One client: its data, its model's training, its calls to the selector."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self.x, self.y = load_shard(options.data)
        self.trainer = Trainer(options.hyper)
        self.calls = SelectorCalls(options.selector, options.work_dir / "files", options.tls)
        self.files = self.calls.files
        self.update = options.work_dir / "update"
        self.rounds_done = 0
        self._model = options.model  # the model the data is checked against, once known

    def _check_data(self, model: Path) -> None:
        problem = self.trainer.data_problem(model, self.x, self.y)
        if problem is not None:
            raise ConfigError("--data", str(self.options.data), f"{problem} (model: {model})")

    async def participate(self) -> None:
        """Check in until accepted (bounded), train, upload."""
        if self._model is not None:
            await trio.to_thread.run_sync(self._check_data, self._model)
        selector = self.options.selector
        for refusal in range(self.options.max_refusals + 1):
            log.info("checking in at %s (the selector holds it until the round starts)", selector)
            refused_ms = await self.calls.check_in()
            if refused_ms is None:
                break
            wait = min(refused_ms / 1000, self.options.max_wait_s)
            log.info(
                "refused by %s (%d of at most %d): checking in again in %.1f s",
                selector,
                refusal + 1,
                self.options.max_refusals + 1,
                wait,
            )
            await trio.sleep(wait)
        else:
            raise GaveUp(f"refused {self.options.max_refusals + 1} times by {selector}")
        self._model = self.files / "model.h5"
        await trio.to_thread.run_sync(self._check_data, self._model)
        log.info("round started: training on %d sample(s)", len(self.y))
        n = await trio.to_thread.run_sync(
            self.trainer.train,
            self.files / "model.h5",
            self.files / "fl_checkpoint",
            self.x,
            self.y,
            self.update,
            self.options.clip_norm,
        )
        await self.calls.upload(self.update, n)
        self.rounds_done += 1
        log.info(
            "round done (%d/%d): uploaded update with n=%d",
            self.rounds_done,
            self.options.rounds,
            n,
        )

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.calls.connect(nursery)
            for _ in range(self.options.rounds):
                await self.participate()
            nursery.cancel_scope.cancel()
