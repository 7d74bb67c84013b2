"""``fl-coordinator health`` against a real gRPC server implementing the standard health service.

The coordinator's own health service is another piece of work; until it
lands, these tests serve ``grpc.health.v1.Health/Check`` with grpcio's
generic handlers (raw bytes, as the wire carries them).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from fl_coordinator.cli import main
from fl_coordinator.health import decode_status, encode_request


@pytest.fixture
def health_server() -> Iterator[tuple[str, list[bytes], list[bytes]]]:
    """A grpcio server answering Check with the next queued bytes; records the requests."""
    answers: list[bytes] = []
    requests: list[bytes] = []

    def check(request: bytes, context: grpc.ServicerContext) -> bytes:
        requests.append(request)
        return answers.pop(0)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", answers, requests
    server.stop(grace=None)


def test_serving_is_exit_0_anything_else_1(
    health_server: tuple[str, list[bytes], list[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    address, answers, requests = health_server
    answers += [b"\x08\x01", b"\x08\x02", b""]
    assert main(["health", "--address", address]) == 0
    assert capsys.readouterr().out == f"{address}: SERVING\n"
    assert main(["health", "--address", address, "--service", "FlIntra"]) == 1
    assert capsys.readouterr().out == f"{address}: NOT_SERVING\n"
    assert main(["health", "--address", address]) == 1
    assert capsys.readouterr().out == f"{address}: UNKNOWN\n"
    assert requests == [b"", b"\x0a\x07FlIntra", b""]


def test_no_health_service_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # serves nothing
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert main(["health", "--address", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
    finally:
        server.stop(grace=None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"fl-coordinator health: 127.0.0.1:{port}: UNIMPLEMENTED (Method not found!)"]


def test_messages_by_hand() -> None:
    assert encode_request() == b""
    assert encode_request("x" * 200) == b"\x0a\xc8\x01" + b"x" * 200  # two-byte length
    assert decode_status(b"\x08\x01") == 1
    assert decode_status(b"") == 0
    assert decode_status(b"\x12\x02ab\x08\x03") == 3  # unknown fields are skipped
