"""Real peers for tests: fake selectors (real gRPC servers), intra clients, a status watcher.

Two independent client implementations talk to the coordinator: the
official ``grpcio`` (method paths spelled out by hand, so a wrong path in our
protos would show) and purerpc.
"""

from __future__ import annotations

import functools
import json
import shutil
import ssl
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
import h5py
import numpy as np
import purerpc
import trio
import trio_websocket

from fl_coordinator._proto import fl_intra_grpc, fl_intra_pb2, fl_round_grpc, fl_round_pb2
from fl_coordinator.app import Endpoints, serve
from fl_coordinator.config import Settings
from fl_coordinator.rpc.listener import serve_grpc
from fl_coordinator.storage.aggregation import aggregate
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.weights import read_plan
from helpers.arrivals import Arrivals


class FakeSelector(fl_intra_grpc.FLGoalCountBroadcastServicer):
    """A real gRPC server answering ``GoalCountReached``; each call lands in ``told``."""

    def __init__(self) -> None:
        self._told_in, self.told = trio.open_memory_channel[None](100)
        self.port = 0

    @property
    def id(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def GoalCountReached(self, message: fl_intra_pb2.Empty) -> fl_intra_pb2.Empty:
        self._told_in.send_nowait(None)
        return fl_intra_pb2.Empty()

    async def start(
        self, nursery: trio.Nursery, ssl_context: ssl.SSLContext | None = None
    ) -> FakeSelector:
        serve = functools.partial(serve_grpc, ssl_context=ssl_context)
        self.port = await nursery.start(serve, [self.service], "127.0.0.1", 0)
        return self


class IntraClient(Protocol):
    async def check_in(self, selector_id: str) -> bool: ...
    async def report(self, selector_id: str) -> None: ...


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying ``token`` (none for None)."""
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


class GrpcioClient:
    """The official grpcio client, run in a worker thread (TLS with ``credentials``)."""

    def __init__(
        self,
        port: int,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        target = f"127.0.0.1:{port}"
        self._channel = (
            grpc.insecure_channel(target)
            if credentials is None
            else grpc.secure_channel(target, credentials)
        )
        self._metadata = bearer(token)
        self._check_in = self._channel.unary_unary(
            "/FlIntra/ClientCountUpdate",
            request_serializer=fl_intra_pb2.ClientCount.SerializeToString,
            response_deserializer=fl_intra_pb2.FlClientStatus.FromString,
        )
        self._report = self._channel.unary_unary(
            "/FlIntra/SelectorAggregationComplete",
            request_serializer=fl_intra_pb2.SelectorId.SerializeToString,
            response_deserializer=fl_intra_pb2.Empty.FromString,
        )
        self._counts: dict[str, int] = {}

    async def check_in(self, selector_id: str) -> bool:
        count = self._counts[selector_id] = self._counts.get(selector_id, 0) + 1
        request = fl_intra_pb2.ClientCount(count=count, id=selector_id)
        answer = await trio.to_thread.run_sync(
            lambda: self._check_in(request, timeout=30, metadata=self._metadata)
        )
        return answer.accepted

    async def report(self, selector_id: str) -> None:
        request = fl_intra_pb2.SelectorId(id=selector_id)
        answer = await trio.to_thread.run_sync(
            lambda: self._report(request, timeout=30, metadata=self._metadata)
        )
        assert isinstance(answer, fl_intra_pb2.Empty)

    def close(self) -> None:
        self._channel.close()


class PurerpcClient:
    def __init__(
        self, port: int, *, ssl_context: ssl.SSLContext | None = None, token: str | None = None
    ) -> None:
        self._port = port
        self._ssl_context = ssl_context
        self._metadata = bearer(token)

    async def _stub(self, call: Callable[[Any], Any], request: Any) -> Any:
        channel = (
            purerpc.insecure_channel("127.0.0.1", self._port)
            if self._ssl_context is None
            else purerpc.secure_channel("127.0.0.1", self._port, self._ssl_context)
        )
        async with channel:
            return await call(fl_intra_grpc.FlIntraStub(channel))(request, metadata=self._metadata)

    async def check_in(self, selector_id: str) -> bool:
        request = fl_intra_pb2.ClientCount(count=1, id=selector_id)
        answer = await self._stub(lambda stub: stub.ClientCountUpdate, request)
        return answer.accepted

    async def report(self, selector_id: str) -> None:
        request = fl_intra_pb2.SelectorId(id=selector_id)
        answer = await self._stub(lambda stub: stub.SelectorAggregationComplete, request)
        assert isinstance(answer, fl_intra_pb2.Empty)


async def purerpc_failure(call: Any) -> purerpc.RpcFailedError:
    """The RpcFailedError of a purerpc call that must fail (purerpc wraps it in groups)."""
    try:
        await call()
    except BaseException as error:
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        assert isinstance(error, purerpc.RpcFailedError), repr(error)
        return error
    raise AssertionError("the call succeeded")


async def eventually(condition: Callable[[], bool], limit: float = 30) -> None:
    """Poll ``condition`` (a state no event announces) until it holds, at most ``limit`` s."""
    with trio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 (no event to wait for: that is the point)
            await trio.sleep(0.01)


async def refused_wait_ms(selector_id: str) -> int:
    """A client checks in at the selector; a refused one is told how long to wait."""
    host, port = selector_id.rsplit(":", 1)
    async with purerpc.insecure_channel(host, int(port)) as channel:
        stream = await fl_round_grpc.FlRoundStub(channel).CheckIn()
        await stream.send_message(fl_round_pb2.CheckInRequest(message="hello"))
        await stream.close()
        messages = []
        while (message := await stream.receive_message()) is not None:
            messages.append(message)
    assert [m.type for m in messages] == [fl_round_pb2.FL_INT]
    return messages[0].intVal


class StatusWatcher:
    """A real websocket subscriber that keeps every message it receives."""

    def __init__(self) -> None:
        self._arrivals: Arrivals[dict[str, Any]] = Arrivals()

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self._arrivals.items

    @property
    def closed(self) -> bool:
        return self._arrivals.ended

    async def run(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        token: str | None = None,
        task_status: trio.TaskStatus[None],
    ) -> None:
        headers = [(b"authorization", f"Bearer {token}".encode())] if token is not None else None
        async with trio_websocket.open_websocket_url(
            url, ssl_context=ssl_context, extra_headers=headers
        ) as ws:
            # Started once the first message came: the server attaches a subscriber to the
            # hub (and sends it the present status) a moment after the handshake, and a test
            # that acts at once would otherwise change what it has not yet subscribed to.
            self._arrivals.add(json.loads(await ws.get_message()))
            task_status.started()
            try:
                while True:
                    self._arrivals.add(json.loads(await ws.get_message()))
            except trio_websocket.ConnectionClosed:
                self._arrivals.end()  # the coordinator went away (some tests kill it)

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first message (already received or future) that satisfies ``predicate``."""
        return await self._arrivals.wait_for(predicate, "the status stream")

    def stages(self) -> list[tuple[int, str]]:
        return stage_sequence(self.messages)


def stage_sequence(messages: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(round, stage) of status messages in order, consecutive repeats collapsed."""
    sequence: list[tuple[int, str]] = []
    for message in messages:
        item = (message["round"], message["stage"])
        if not sequence or sequence[-1] != item:
            sequence.append(item)
    return sequence


async def watch(
    nursery: trio.Nursery,
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    token: str | None = None,
) -> StatusWatcher:
    watcher = StatusWatcher()
    await nursery.start(functools.partial(watcher.run, url, ssl_context=ssl_context, token=token))
    return watcher


#: A websocket upgrade of the status stream, as a raw peer sends it (RFC 6455's sample key).
UPGRADE = (
    b"GET /status HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def answer_to(port: int, data: bytes) -> bytes:
    """What the server at ``port`` sends back to ``data`` before it closes the connection (30 s)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(30):
            while chunk := await stream.receive_some():
                received += chunk
    return received


def completed(round_no: int) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m["round"] == round_no and m["stage"] in ("COMPLETED", "FAILED")


def write_aggregate(layout: Layout, selector_id: str, source: Path, weight: int) -> None:
    """What a selector leaves for the coordinator: ``A_s`` (HDF5) and ``N_s`` (text)."""
    layout.selector_dir(selector_id).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, layout.agg_checkpoint(selector_id))
    layout.agg_weight(selector_id).write_text(f"{weight}\n")


def read_floats(path: Path) -> dict[str, np.ndarray]:
    """The weight arrays of a checkpoint, decoded (bfloat16 as ``ml_dtypes.bfloat16``)."""
    with h5py.File(path, "r") as file:
        return {
            weight.name: weight.encoding.decode(np.asarray(file[weight.name][()]))
            for weight in read_plan(file, path)
        }


def fedavg(
    global_weights: dict[str, np.ndarray], aggregates: list[tuple[Path, int]]
) -> dict[str, np.ndarray]:
    """PROTOCOL.md's arithmetic, recomputed independently with numpy in float64."""
    total_weight = sum(weight for _, weight in aggregates)
    sums = {name: np.zeros(array.shape) for name, array in global_weights.items()}
    for path, _ in aggregates:
        for name, array in read_floats(path).items():
            sums[name] += array.astype(np.float64)
    return {
        name: (array.astype(np.float64) + sums[name] / total_weight).astype(array.dtype)
        for name, array in global_weights.items()
    }


def assert_arrays_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)


async def serve_and_watch(
    nursery: trio.Nursery, settings: Settings
) -> tuple[Endpoints, StatusWatcher, PurerpcClient]:
    """A coordinator on loopback, a websocket subscriber to it, and a purerpc intra client."""
    endpoints = await nursery.start(serve, settings)
    return endpoints, await watch(nursery, endpoints.status_url), PurerpcClient(endpoints.grpc_port)


async def run_round(
    nursery: trio.Nursery,
    port: int,
    watcher: StatusWatcher,
    layout: Layout,
    sources: Sequence[tuple[Path, int]],
    number: int = 1,
) -> dict[str, Any]:
    """One whole round at the coordinator on ``port`` (its goal: ``len(sources)``).

    One fake selector per source checks in one client, is told, writes that
    source as its aggregate with that weight and reports. Returns the round's
    COMPLETED or FAILED status message.
    """
    client = PurerpcClient(port)
    selectors = [await FakeSelector().start(nursery) for _ in sources]
    for selector in selectors:
        assert await client.check_in(selector.id) is True
    for selector, (path, weight) in zip(selectors, sources, strict=True):
        await selector.told.receive()
        write_aggregate(layout, selector.id, path, weight)
        await client.report(selector.id)
    return await watcher.wait_for(completed(number))


async def one_selector_round(
    nursery: trio.Nursery, settings: Settings, aggregate: Path, weight: int
) -> dict[str, Any]:
    """A coordinator serving one round of one client, held by one fake selector that
    reports ``aggregate`` with ``weight``; the round's last status message."""
    layout = Layout.from_settings(settings)
    _, watcher, client = await serve_and_watch(nursery, settings.replace(checkin_limit=1))
    selector = await FakeSelector().start(nursery)
    assert await client.check_in(selector.id) is True
    await selector.told.receive()
    write_aggregate(layout, selector.id, aggregate, weight)
    await client.report(selector.id)
    return await watcher.wait_for(completed(1))


async def aggregating_round(
    settings: Settings,
    layout: Layout,
    keras_weights,
    nursery: trio.Nursery,
    *,
    hold: float = 30,
) -> tuple[Endpoints, StatusWatcher, PurerpcClient, threading.Event]:
    """A coordinator (goal 1) whose round 1 is aggregating, held at a gate until ``release``
    (or ``hold`` seconds at most: a failing test does not hang).

    Returns its endpoints, a status watcher, a client, and the gate.
    """
    started, release = trio.Event(), threading.Event()

    def paced_aggregate(*args):  # the real aggregation, held at the gate until released
        trio.from_thread.run_sync(started.set)
        release.wait(timeout=hold)
        return aggregate(*args)

    endpoints = await nursery.start(
        lambda task_status: serve(
            settings.replace(checkin_limit=1), aggregator=paced_aggregate, task_status=task_status
        )
    )
    first = await FakeSelector().start(nursery)
    watcher = await watch(nursery, endpoints.status_url)
    client = PurerpcClient(endpoints.grpc_port)
    assert await client.check_in(first.id) is True
    await first.told.receive()
    write_aggregate(layout, first.id, keras_weights[0], weight=1)
    await client.report(first.id)
    await started.wait()
    return endpoints, watcher, client, release
