"""Answers to the coordinator's own calls (GoalCountReached to a selector, the legacy status
push to WEBSERVER_ADDRESS) are bounded: a peer that answers with a compressed bomb fails that
call, and the coordinator never inflates more than ``MAX_ANSWER_BYTES``.

purerpc's client took answers of up to 32 MiB and inflated them whole on the event loop: a
4 MB answer inflating to 4 GiB froze the loop 21 s and took 8 GB (rt3's attack_response_bomb).
The peer here is grpcio, compressing as it does (deflate: zlib's format, gzip: RFC 1952).
"""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
import trio

from fl_coordinator._proto import fl_status_grpc, fl_status_pb2
from fl_coordinator.federation.link import GrpcLink, LinkLost
from fl_coordinator.rpc.addresses import MAX_ANSWER_BYTES, call_once


def _server(answer: bytes, compression: grpc.Compression) -> tuple[grpc.Server, int]:
    """A grpcio FlStatus server answering every RoundStatus with ``answer``, compressed."""

    def round_status(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_compression(compression)
        return answer

    handler = grpc.method_handlers_generic_handler(
        "FlStatus", {"RoundStatus": grpc.unary_unary_rpc_method_handler(round_status)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _padded(size: int) -> bytes:
    """A valid answer (an empty message) carrying an unknown field of ``size`` zero bytes,
    which protobuf parses and skips: without a bound, it is taken whole."""
    length = bytearray()
    rest = size
    while rest >= 0x80:
        length.append(rest & 0x7F | 0x80)
        rest >>= 7
    length.append(rest)
    return bytes([15 << 3 | 2]) + bytes(length) + bytes(size)


async def _call(port: int) -> str:
    """One RoundStatus call: the answer's type, or the errors it ended with."""
    request = fl_status_pb2.FlRoundStatus(stage=fl_status_pb2.REPORTING, roundNo=4)
    try:
        answer = await call_once(
            f"127.0.0.1:{port}",
            lambda channel: fl_status_grpc.FlStatusStub(channel).RoundStatus(request),
            seconds=30,
        )
    except Exception as error:  # the error itself, as the legacy push's log line names it
        return f"{type(error).__name__}: {error}"
    return type(answer).__name__


@pytest.mark.parametrize("compression", [grpc.Compression.Deflate, grpc.Compression.Gzip])
async def test_an_answer_that_inflates_past_the_bound_fails_its_call(
    compression: grpc.Compression,
) -> None:
    # 64 MiB of zeros: about 64 KB on the wire, under any bound on the compressed size.
    server, port = _server(bytes(64 << 20), compression)
    try:
        outcome = await _call(port)
    finally:
        server.stop(None)
    expected = f"message inflates to more than {MAX_ANSWER_BYTES} bytes"
    assert outcome == f"MessageTooLargeError: {expected}"


async def test_an_answer_over_the_bound_fails_its_call_before_it_is_read() -> None:
    server, port = _server(b"\x00" * (MAX_ANSWER_BYTES + 1), grpc.Compression.NoCompression)
    try:
        outcome = await _call(port)
    finally:
        server.stop(None)
    assert outcome == (
        "MessageTooLargeError: Received message larger than max: "
        f"{MAX_ANSWER_BYTES + 1} > {MAX_ANSWER_BYTES}"
    )


@pytest.mark.parametrize("compression", [grpc.Compression.Deflate, grpc.Compression.Gzip])
async def test_a_compressed_answer_within_the_bound_is_taken(
    compression: grpc.Compression,
) -> None:
    server, port = _server(fl_status_pb2.NULL().SerializeToString(), compression)
    try:
        outcome = await _call(port)
    finally:
        server.stop(None)
    assert outcome == "NULL"


@pytest.mark.parametrize("compression", [grpc.Compression.Deflate, grpc.Compression.Gzip])
async def test_the_reference_selector_and_client_bound_answers_too(
    compression: grpc.Compression,
) -> None:
    """Their calls (the selector's to the coordinator, the client's to its selector) go
    through :class:`GrpcLink`, which took purerpc's 32 MiB and inflated it whole."""
    server, port = _server(_padded(20 << 20), compression)  # under purerpc's 32 MiB
    request = fl_status_pb2.FlRoundStatus(stage=fl_status_pb2.REPORTING, roundNo=4)
    try:
        async with trio.open_nursery() as nursery:
            link = GrpcLink(nursery, f"127.0.0.1:{port}")
            with pytest.raises(BaseException) as raised:
                await link.call(lambda ch: fl_status_grpc.FlStatusStub(ch).RoundStatus(request))
            nursery.cancel_scope.cancel()
    finally:
        server.stop(None)
    assert isinstance(raised.value, LinkLost)
    assert str(raised.value) == (
        f"the connection to the coordinator at 127.0.0.1:{port} was lost: "
        f"message inflates to more than {MAX_ANSWER_BYTES} bytes"
    )
