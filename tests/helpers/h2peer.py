"""A raw HTTP/2 gRPC peer on a blocking socket: the attacks no well-behaved client makes.

Frames are written by the ``h2`` library (client side), so they are valid
HTTP/2; what they say is up to the test: half-sent requests, resets, streams
beyond the limit, connections never closed. Blocking sockets keep it simple;
tests with an in-process server run it in a worker thread.
"""

from __future__ import annotations

import math
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from google.protobuf.message import Message

from fl_coordinator._proto import fl_intra_pb2

CHECK_IN = "/FlIntra/ClientCountUpdate"


def grpc_body(message: Message) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return framed(message.SerializeToString())


def framed(data: bytes) -> bytes:
    """``data`` (a serialized message) as a gRPC length-prefixed message (uncompressed)."""
    return struct.pack(">BI", 0, len(data)) + data


def check_in_body(selector_id: str) -> bytes:
    return grpc_body(fl_intra_pb2.ClientCount(count=1, id=selector_id))


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def padded(message: Message, padding: int) -> bytes:
    """``message`` serialized, with ``padding`` bytes more in field 15, which no message of
    ours has (proto3 parses it and keeps it as an unknown field)."""
    extra = b"\x7a" + varint(padding) + b"p" * padding if padding else b""
    return message.SerializeToString() + extra


def request_headers(path: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
    ]


class _Connection(h2.connection.H2Connection):
    """h2's client connection, open on after a GOAWAY (h2 closes at once, so that the
    answers of calls still in flight, which HTTP/2 lets the server send, break it:
    python-hyper/h2 issue 1181); opening streams after one is up to the test."""

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class RawPeer:
    """One HTTP/2 connection to ``127.0.0.1:port``, driven frame by frame."""

    def __init__(self, port: int, *, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.h2 = _Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.closed_by_server = False

    def send(self) -> None:
        """Write what h2 has queued."""
        self.sock.sendall(self.h2.data_to_send())

    def open_stream(
        self,
        path: str = CHECK_IN,
        body: bytes = b"",
        *,
        end: bool = False,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> int:
        """Queue HEADERS (and ``body`` as DATA, ending the stream with ``end``)."""
        stream_id = self.h2.get_next_available_stream_id()
        headers = [*request_headers(path), *metadata]
        self.h2.send_headers(stream_id, headers, end_stream=end and not body)
        if body:
            self.h2.send_data(stream_id, body, end_stream=end)
        return stream_id

    def reset(self, stream_id: int) -> None:
        self.h2.reset_stream(stream_id)

    def send_data_when_allowed(self, stream_id: int, body: bytes) -> None:
        """Queue ``body`` once flow control lets it go (reading the server's window updates)."""
        while self.h2.local_flow_control_window(stream_id) < len(body):
            self.send()
            if not self.receive():
                raise AssertionError("the server closed the connection")
        self.h2.send_data(stream_id, body)

    def push(self, stream_id: int, body: bytes, frame: int = 16384) -> int:
        """Send ``body`` (ending the stream) as flow control lets it go, unless the server
        closes the stream first (bytes of it sent: ``len(body)`` if whole)."""
        for start in range(0, len(body), frame):
            chunk = body[start : start + frame]
            try:
                while self.h2.local_flow_control_window(stream_id) < len(chunk):
                    self.send()
                    if not self.receive():
                        raise AssertionError("the server closed the connection")
                self.h2.send_data(stream_id, chunk, end_stream=start + frame >= len(body))
                self.send()
                while select.select([self.sock], [], [], 0)[0] and self.receive():
                    pass  # what the server said meanwhile (the end of this stream?)
            except h2.exceptions.StreamClosedError:
                return start
        return len(body)

    def answer(self, stream_id: int) -> dict[str, str] | None:
        """The trailers (``grpc-status``, ``grpc-message``) of ``stream_id``, once received."""
        for event in self.events:
            if _ends(event, stream_id):
                return dict(event.headers)
        return None

    def receive(self) -> bool:
        """Read once; False at the end of the connection (EOF or reset). TimeoutError."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed_by_server = True
            return False
        self.events.extend(self.h2.receive_data(data))
        try:
            self.send()  # acknowledgements
        except (BrokenPipeError, ConnectionResetError):  # it closed after its last words
            self.closed_by_server = True
            return False
        return True

    def receive_until(self, done: Callable[[list[h2.events.Event]], bool]) -> None:
        while not done(self.events) and self.receive():
            pass

    def call(
        self, path: str, body: bytes, metadata: tuple[tuple[str, str], ...] = ()
    ) -> dict[str, str]:
        """A whole unary call; returns the trailers (``grpc-status``, ``grpc-message``)."""
        stream_id = self.open_stream(path, body, end=True, metadata=metadata)
        self.send()
        self.receive_until(lambda events: any(_ends(e, stream_id) for e in events))
        answer = self.answer(stream_id)
        if answer is None:
            raise AssertionError(f"the connection ended before the answer: {self.events}")
        return answer

    def answers_a_ping(self, data: bytes = b"still on") -> bool:
        """Send a PING and read until its answer: whether the connection is still open."""
        self.h2.ping(data)
        self.send()
        self.receive_until(
            lambda events: any(
                isinstance(e, h2.events.PingAckReceived) and e.ping_data == data for e in events
            )
        )
        return not self.closed_by_server

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        """The last GOAWAY received (a graceful close sends two), if any."""
        found = [e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)]
        return found[-1] if found else None

    def wait_closed(self, limit: float) -> float:
        """Read until the server closes the connection: seconds it took (inf: not within limit)."""
        started = time.monotonic()
        self.sock.settimeout(limit)
        try:
            while self.receive():
                pass
        except TimeoutError:
            return math.inf
        return time.monotonic() - started

    def close(self) -> None:
        self.sock.close()


def _ends(event: h2.events.Event, stream_id: int) -> bool:
    return (
        isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived)
        and event.stream_id == stream_id
        and event.stream_ended is not None
    )
