"""Requests that are small by the protocol are refused when large, before they are parsed.

A coordinator on loopback (in process); peers are raw HTTP/2 connections
(``helpers.h2peer``, in worker threads), grpcio and purerpc. Each large
request is well within GRPC_MAX_MESSAGE_BYTES (4 MiB): only the method's own
limit (``SMALL_REQUEST_BYTES``, 16 KiB) refuses it.

Before (78903f7): a check-in, report or health check of 4 MiB (a valid
message plus an unknown field) was read whole, parsed and served: a check-in
held while the round aggregated kept its 4 MiB for as long (rt12: 50 of them,
23 -> 223 MiB of RSS).
"""

from __future__ import annotations

import functools
import gzip
import logging
import struct
import urllib.parse
from collections.abc import Callable

import grpc
import h2.errors
import h2.events
import purerpc
import pytest
import trio
from google.protobuf.message import Message
from helpers.h2peer import RawPeer, grpc_body, padded
from helpers.peers import purerpc_failure

from fl_coordinator._proto import fl_intra_batch_pb2, fl_intra_grpc, fl_intra_pb2, health_pb2
from fl_coordinator.app import serve
from fl_coordinator.config import Settings
from fl_coordinator.rpc.request_limits import SMALL_REQUEST_BYTES

#: A request's size: far over its method's limit, under the server's (GRPC_MAX_MESSAGE_BYTES).
LARGE = 4 * 1024 * 1024 - 1024
SELECTOR = "127.0.0.1:1"

#: Every method the coordinator serves, with a request it answers (status 0).
REQUESTS: dict[str, Message] = {
    "/FlIntra/ClientCountUpdate": fl_intra_pb2.ClientCount(count=1, id=SELECTOR),
    "/FlIntra/SelectorAggregationComplete": fl_intra_pb2.SelectorId(id=SELECTOR),
    "/flcoordinator.v1.FlIntraBatch/CheckInClients": fl_intra_batch_pb2.ClientBatch(
        id=SELECTOR, clients=1
    ),
    "/flcoordinator.v1.FlIntraBatch/ReleaseClients": fl_intra_batch_pb2.ClientRelease(
        id=SELECTOR, clients=1, round=1
    ),
    "/flcoordinator.v1.FlIntraBatch/ReportAggregate": fl_intra_batch_pb2.AggregateReport(
        id=SELECTOR, round=1
    ),
    "/grpc.health.v1.Health/Check": health_pb2.HealthCheckRequest(service=""),
}


def refused_at_its_prefix(peer: RawPeer, path: str) -> dict[str, str]:
    """A request announcing a LARGE message, of which only the first 16 KiB are sent: the
    trailers of its answer (the server must answer from the length prefix alone)."""
    stream_id = peer.open_stream(path)
    body = struct.pack(">BI", 0, LARGE) + padded(REQUESTS[path], LARGE)
    peer.h2.send_data(stream_id, body[:16384])
    peer.send()
    peer.receive_until(lambda events: peer.answer(stream_id) is not None)
    peer.receive_until(lambda events: any(reset(e, stream_id) for e in events))
    answer = peer.answer(stream_id)
    assert answer is not None
    return answer


def reset(event: h2.events.Event, stream_id: int) -> bool:
    """The server reset the stream, asking for no more of its data (NO_ERROR)."""
    return (
        isinstance(event, h2.events.StreamReset)
        and event.stream_id == stream_id
        and event.error_code == h2.errors.ErrorCodes.NO_ERROR
    )


def the_refusal(path: str) -> str:
    return (
        f"request message larger than the limit of {SMALL_REQUEST_BYTES} bytes for {path}, "
        "whose requests are a few hundred bytes by the protocol; send only the fields of its "
        "request message"
    )


async def test_every_served_method_refuses_a_large_request_from_its_length_prefix(
    settings: Settings, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Each of the six methods, on one connection: RESOURCE_EXHAUSTED (8) with what, the limit
    and what to do, the stream reset (NO_ERROR), one throttled log line for the six, and the
    same connection then serves a normal request of each method (status 0)."""
    caplog.set_level(logging.WARNING)
    endpoints = await nursery.start(serve, settings)
    peer = await trio.to_thread.run_sync(
        functools.partial(RawPeer, timeout=20), endpoints.grpc_port
    )
    for path in REQUESTS:
        trailers = await trio.to_thread.run_sync(refused_at_its_prefix, peer, path)
        message = urllib.parse.unquote(trailers.get("grpc-message", ""))
        assert (trailers["grpc-status"], message) == ("8", the_refusal(path)), path
    for path, request in REQUESTS.items():
        answer = await trio.to_thread.run_sync(peer.call, path, grpc_body(request))
        assert answer["grpc-status"] == "0", (path, answer)
    assert peer.goaway() is None
    peer.close()
    lines = [r.getMessage() for r in caplog.records if "larger than the limit" in r.getMessage()]
    assert len(lines) == 1, lines  # the same kind from the same peer: throttled
    assert f"larger than the limit of {SMALL_REQUEST_BYTES} bytes for /FlIntra/" in lines[0]


async def test_a_compressed_request_inflating_past_its_methods_limit_is_refused(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """1 MiB of zeros (1 KiB gzipped) as a check-in: refused as it inflates past 16 KiB,
    that call only (before: inflated whole, then answered INTERNAL as unparsable)."""
    endpoints = await nursery.start(serve, settings)
    peer = await trio.to_thread.run_sync(RawPeer, endpoints.grpc_port)
    data = gzip.compress(bytes(1 << 20))
    body = struct.pack(">BI", 1, len(data)) + data
    path = "/FlIntra/ClientCountUpdate"
    trailers = await trio.to_thread.run_sync(peer.call, path, body, (("grpc-encoding", "gzip"),))
    assert trailers["grpc-status"] == "8"
    answer = await trio.to_thread.run_sync(peer.call, path, grpc_body(REQUESTS[path]))
    assert answer["grpc-status"] == "0"
    peer.close()


def grpcio_check_ins(port: int) -> tuple[grpc.StatusCode, str, bool]:
    """A padded check-in (refused: its code and details), then a plain one on the same
    channel (its answer)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check_in = channel.unary_unary(
            "/FlIntra/ClientCountUpdate",
            request_serializer=lambda request: request,
            response_deserializer=fl_intra_pb2.FlClientStatus.FromString,
        )
        request = REQUESTS["/FlIntra/ClientCountUpdate"]
        with pytest.raises(grpc.RpcError) as refused:
            check_in(padded(request, LARGE), timeout=30)
        answer = check_in(request.SerializeToString(), timeout=30)
    return refused.value.code(), refused.value.details(), answer.accepted


async def test_grpcio_and_purerpc_clients_are_refused_with_resource_exhausted(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """A 4 MiB check-in from each library: RESOURCE_EXHAUSTED with the reason; their next,
    normal check-in on the same channel is accepted."""
    endpoints = await nursery.start(serve, settings.replace(checkin_limit=10))
    port = endpoints.grpc_port
    code, details, accepted = await trio.to_thread.run_sync(grpcio_check_ins, port)
    assert (code, details, accepted) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        the_refusal("/FlIntra/ClientCountUpdate"),
        True,
    )

    large = fl_intra_pb2.ClientCount.FromString(
        padded(REQUESTS["/FlIntra/ClientCountUpdate"], LARGE)
    )
    assert large.ByteSize() > LARGE  # the unknown field travels
    async with purerpc.insecure_channel("127.0.0.1", port) as channel:
        stub = fl_intra_grpc.FlIntraStub(channel)
        call: Callable = stub.ClientCountUpdate
        failure = await purerpc_failure(lambda: call(large))
        assert (failure.status.status_code, failure.status.status_message) == (
            purerpc.StatusCode.RESOURCE_EXHAUSTED,
            the_refusal("/FlIntra/ClientCountUpdate"),
        )
        answer = await call(fl_intra_pb2.ClientCount(count=2, id="127.0.0.1:2"))
        assert answer.accepted is True
