"""The little HTTP/1.1 the status and metrics ports speak, on h11: one request per connection.

A request is read with a bound on its size (:data:`MAX_REQUEST_BYTES`), and
the bytes it came in are kept, so the status port can hand a websocket
upgrade, as received, to wsproto (:class:`Head`). Every answer closes the
connection (``Connection: close``): a scrape every few seconds or a page's
few requests do not need keep-alive, and it keeps the handlers trivial.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import h11
import trio

__all__ = ["MAX_REQUEST_BYTES", "Answer", "Head", "linger", "read_head", "send_answer"]

#: The largest request head a client may send (its bytes, headers included).
MAX_REQUEST_BYTES = 16384

#: What is read and dropped after a refusal, at most, so the refusal is not reset away.
_LINGER_BYTES = 4 * MAX_REQUEST_BYTES
_LINGER_SECONDS = 2.0

_REASONS = {400: "Bad Request", 431: "Request Header Fields Too Large"}


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
    def reads(self) -> bool:
        """A GET, or a HEAD (answered as a GET, without the body)."""
        return self.request.method in (b"GET", b"HEAD")

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


async def read_head(stream: trio.abc.Stream) -> Head:
    """Read one request head.

    A head that is malformed or over :data:`MAX_REQUEST_BYTES` is answered
    with h11's status for it (400, or 431 Request Header Fields Too Large)
    before h11.RemoteProtocolError is raised, so a client learns why it was
    cut off; a peer that closes first gets nothing (trio.BrokenResourceError).
    """
    try:
        return await _receive_head(stream)
    except h11.RemoteProtocolError as error:
        status = error.error_status_hint
        refusal = f"HTTP/1.1 {status} {_REASONS.get(status, 'Bad Request')}\r\n"
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(
                f"{refusal}content-length: 0\r\nconnection: close\r\n\r\n".encode()
            )
            await linger(stream)
        raise


async def linger(stream: trio.abc.Stream) -> None:
    """Close our side, then discard what the peer still sends, a little and briefly.

    Closing a socket with unread bytes makes the kernel reset the connection,
    which can destroy our answer before the peer reads it (the "lingering
    close" web servers do, bounded here by :data:`_LINGER_BYTES` and
    :data:`_LINGER_SECONDS`).
    """
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()
    discarded = 0
    with trio.move_on_after(_LINGER_SECONDS):
        while discarded < _LINGER_BYTES and (data := await stream.receive_some(MAX_REQUEST_BYTES)):
            discarded += len(data)


async def _receive_head(stream: trio.abc.ReceiveStream) -> Head:
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
            raise trio.BrokenResourceError("closed before a request")
        received += data
        if len(received) > MAX_REQUEST_BYTES:  # h11's own bound only counts what it waits on
            raise h11.RemoteProtocolError(
                f"request head over {MAX_REQUEST_BYTES} bytes", error_status_hint=431
            )
        connection.receive_data(bytes(data))


async def send_answer(stream: trio.abc.SendStream, head: Head, answer: Answer) -> None:
    """Send ``answer`` to the request ``head`` as a complete response that closes the connection.

    A ``HEAD`` request gets the same head and no body (RFC 9110 9.3.2: h11
    refuses to send one, and the request went unanswered, with a traceback).
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
        *([] if head.request.method == b"HEAD" else [h11.Data(data=answer.body)]),
        h11.EndOfMessage(),
    ]
    await stream.send_all(b"".join(head.connection.send(event) or b"" for event in events))
