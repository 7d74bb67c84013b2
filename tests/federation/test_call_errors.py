"""What a caller is told when a connection ends before the answer: by the peer's first bytes."""

from __future__ import annotations

import h2.config
import h2.connection
import pytest

from fl_coordinator.federation.call_errors import explain, is_mistake
from fl_coordinator.federation.link import LinkLost


def server_preface() -> bytes:
    """The first bytes a real HTTP/2 server (h2, as in purerpc) sends: its SETTINGS frame."""
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    return server.data_to_send()[:32]


def test_a_grpc_server_that_closed_is_not_taken_for_another_kind_of_port() -> None:
    lost = LinkLost("lost", server_preface())
    assert explain(lost, "sel1.example:50051", "selector") == (
        "the selector at sel1.example:50051 closed the connection before answering"
    )
    assert is_mistake(lost) is False  # a peer that went away: not a setting to fix


@pytest.mark.parametrize(
    ("first", "said"),
    [
        (
            b"HTTP/1.1 400 Bad Request\r\n",
            "answered in HTTP/1 (HTTP/1.1 400 Bad Request), not gRPC",
        ),
        (b"\x15\x03\x03\x00\x02\x02\x46", "answered with a TLS alert"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "answered with bytes that are not HTTP/2"),
    ],
)
def test_other_kinds_of_port_are_named(first: bytes, said: str) -> None:
    lost = LinkLost("lost", first)
    assert said in explain(lost, "sel1.example:50051", "selector")
    assert is_mistake(lost) is True


def test_a_connection_closed_without_a_byte_suggests_tls_to_a_plaintext_caller() -> None:
    """A TLS server closes a plaintext connection without a byte (no alert)."""
    lost = LinkLost("lost", b"")
    hint = "if it serves TLS, give the client --selector-ca"
    assert explain(lost, "sel1.example:50051", "selector", tls_hint=hint) == (
        f"the selector at sel1.example:50051 closed the connection before answering: {hint}"
    )
    # Once it has spoken HTTP/2, it is a gRPC server that went away: no TLS hint.
    assert explain(LinkLost("lost", server_preface()), "sel1.example:50051", "selector",
                   tls_hint=hint).endswith("closed the connection before answering")  # fmt: skip
