"""The little HTTP/1.1 the status and metrics ports speak, on h11: one request per connection.

A request is read with a bound on its size (:data:`MAX_REQUEST_BYTES`), and
the bytes it came in are kept, so the status port can hand a websocket
upgrade, as received, to wsproto (:class:`Head`). Every answer closes the
connection (``Connection: close``): a scrape every few seconds or a page's
few requests do not need keep-alive, and it keeps the handlers trivial.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import trio

__all__ = ["MAX_REQUEST_BYTES", "Answer", "Head", "read_head", "send_answer"]

#: The largest request head a client may send (its bytes, headers included).
MAX_REQUEST_BYTES = 16384


@dataclass(frozen=True)
class Head:
    """A request as read: h11's event and connection, and the bytes received (for a replay)."""

    request: h11.Request
    received: bytes
    connection: h11.Connection

    @property
    def path(self) -> str:
        return self.request.target.split(b"?", 1)[0].decode("ascii", "replace")

    @property
    def query(self) -> str:
        parts = self.request.target.split(b"?", 1)
        return parts[1].decode("ascii", "replace") if len(parts) > 1 else ""

    def header(self, name: bytes) -> bytes | None:
        """The value of header ``name`` (lower case), or None."""
        for key, value in self.request.headers:
            if key == name:
                return bytes(value)
        return None

    @property
    def upgrades_to_websocket(self) -> bool:
        return (self.header(b"upgrade") or b"").lower() == b"websocket"


@dataclass(frozen=True)
class Answer:
    """An HTTP response with its whole body."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


async def read_head(stream: trio.abc.ReceiveStream) -> Head:
    """Read one request head. Raises h11.RemoteProtocolError (malformed, too large, closed)."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    received = bytearray()
    while True:
        event = connection.next_event()
        if isinstance(event, h11.Request):
            return Head(event, bytes(received), connection)
        if event is not h11.NEED_DATA:
            raise h11.RemoteProtocolError(f"unexpected {event!r}")
        data = await stream.receive_some(MAX_REQUEST_BYTES)
        if not data:
            raise h11.RemoteProtocolError("closed before a request")
        received += data
        if len(received) > MAX_REQUEST_BYTES:  # h11's own bound only counts what it waits on
            raise h11.RemoteProtocolError(f"request head over {MAX_REQUEST_BYTES} bytes")
        connection.receive_data(bytes(data))


async def send_answer(stream: trio.abc.SendStream, head: Head, answer: Answer) -> None:
    """Send ``answer`` to the request ``head`` as a complete response that closes the connection.

    Raises h11.LocalProtocolError if h11 cannot answer that request (a bug).
    """
    headers = [
        ("content-type", answer.content_type),
        ("content-length", str(len(answer.body))),
        ("connection", "close"),
        *answer.headers,
    ]
    events = [
        h11.Response(status_code=answer.status, headers=headers),
        h11.Data(data=answer.body),
        h11.EndOfMessage(),
    ]
    await stream.send_all(b"".join(head.connection.send(event) or b"" for event in events))
