"""One websocket subscriber after its handshake: messages written as they are published.

A status change goes to every subscriber as the same bytes (one text frame,
:attr:`.hub.Published.frame`: a server's frames are not masked). When the
hub publishes, :meth:`Subscriber.put` writes those bytes to the subscriber's
socket at once, without waiting and without waking a task: that is the
common case (the socket's buffer has room), and it costs one ``write``
system call per subscriber. Only what the socket does not take at once (its
buffer is full: the peer reads slowly or not at all, or the stream is TLS,
which must encrypt) is queued and written by the subscriber's own task,
:meth:`Subscriber.send`, which gives up after ``send_timeout`` seconds; so a
subscriber that stopped reading delays only itself, and holds at most the
rest of one frame and ``queue_length`` messages (the oldest dropped, as for
any subscription of the hub: each message is a whole snapshot).

The rest of the protocol is wsproto's (RFC 6455): pings are answered (the
latest only, so a peer that pings without reading costs one pong; none after
our close, which must be the last frame we send), a close
is answered and ends the connection, and a message from the subscriber
larger than ``max_message_bytes`` closes it with code 1009. Control frames
go through the same queue, after the rest of a frame already begun, so
they never cut into a message.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass

import trio
from wsproto import ConnectionState, WSConnection
from wsproto.events import CloseConnection, Message, Ping

from .hub import Published

__all__ = ["MESSAGE_TOO_BIG", "Subscriber", "SubscriberLimits"]

#: WebSocket close code of a message larger than the server accepts (RFC 6455).
MESSAGE_TOO_BIG = 1009
_RECEIVE_BYTES = 65536


@dataclass(frozen=True)
class SubscriberLimits:
    """What one subscriber may cost: see the STATUS_* and HANDSHAKE_TIMEOUT keys."""

    queue_length: int  # messages kept while its socket takes none (oldest dropped)
    send_timeout: float  # seconds one write may wait on a peer that does not read
    close_timeout: float  # seconds the peer has to answer our close
    max_message_bytes: int  # the largest message it may send us


class Subscriber:
    """Writes the hub's messages to one accepted websocket stream and reads its frames.

    ``stream`` is the connection after the HTTP upgrade; ``connection`` the
    wsproto connection that accepted it. :meth:`put` is the hub's
    :class:`~.hub.Sink`; run :meth:`send` and :meth:`receive` in tasks.
    """

    def __init__(
        self, stream: trio.abc.Stream, connection: WSConnection, limits: SubscriberLimits
    ) -> None:
        self._stream = stream
        self._connection = connection
        self._limits = limits
        # Plain TCP is written directly; TLS must go through its stream.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._rest: memoryview | None = None  # the part of a frame not yet written
        self._outbox: collections.deque[bytes] = collections.deque(maxlen=limits.queue_length)
        self._pong: bytes | None = None
        self._close: bytes | None = None
        self._writing = False  # send() has bytes to write: put() must queue behind them
        self._wake = trio.Event()
        self.closing = False  # a close frame was sent or queued: no more messages
        self.dropped = 0  # messages dropped while the socket took none
        self.too_big = False  # it sent a message over max_message_bytes
        self._message_bytes = 0  # of the message it is sending us

    def put(self, published: Published) -> None:
        """Write ``published`` now if the socket takes it, else queue it; never waits."""
        if self.closing:
            return
        frame = published.frame
        if self._writing or self._fd < 0:
            if len(self._outbox) == self._outbox.maxlen:
                self.dropped += 1
            self._outbox.append(frame)
        else:
            try:
                sent = os.write(self._fd, frame)
            except OSError:  # full (BlockingIOError), or reset: send() finds out which
                sent = 0
            if sent == len(frame):
                return
            self._rest = memoryview(frame)[sent:]
        self._start_writing()

    def _start_writing(self) -> None:
        self._writing = True
        self._wake.set()

    def _next(self) -> bytes | memoryview | None:
        """What to write next: the rest of a frame begun, a pong, the close or a message."""
        if self._rest is not None:
            rest, self._rest = self._rest, None
            return rest
        if self._pong is not None:
            pong, self._pong = self._pong, None
            return pong
        if self._close is not None:
            close, self._close = self._close, None
            return close
        if self._outbox and not self.closing:
            return self._outbox.popleft()
        return None

    async def send(self) -> None:
        """Write what :meth:`put` could not, and control frames; return once the close is sent.

        Raises trio.TooSlowError when one write waits ``send_timeout`` (the
        peer stopped reading), trio.BrokenResourceError when the peer is gone.
        """
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while (data := self._next()) is not None:
                with trio.fail_after(self._limits.send_timeout):
                    await self._stream.send_all(data)
            self._writing = False
            if self.closing:
                return

    def close(self, code: int) -> None:
        """Queue a close frame with ``code``; the peer's answer ends :meth:`receive`."""
        if not self.closing and self._connection.state is ConnectionState.OPEN:
            self._close = self._connection.send(CloseConnection(code=code))
            self.closing = True
            self._outbox.clear()
            self._start_writing()

    async def receive(self) -> None:
        """Read the subscriber's frames until it goes away or the closing handshake is over.

        After a close of ours, the peer has ``close_timeout`` seconds to answer.
        """
        with trio.CancelScope() as reading:
            while self._connection.state is not ConnectionState.CLOSED:
                try:
                    data = await self._stream.receive_some(_RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                self._connection.receive_data(data)
                self._handle_events()
                if self.closing and reading.deadline == float("inf"):
                    reading.deadline = trio.current_time() + self._limits.close_timeout
                if self._connection.state is ConnectionState.REMOTE_CLOSING:
                    return  # its close is answered (by send()); nothing more to read

    def _handle_events(self) -> None:
        for event in self._connection.events():
            if isinstance(event, Ping):
                # Once a close is sent, no pong may follow it (wsproto refuses one).
                if self._connection.state is ConnectionState.OPEN:
                    self._pong = self._connection.send(event.response())
                    self._start_writing()
            elif isinstance(event, CloseConnection):
                if self._connection.state is ConnectionState.REMOTE_CLOSING:
                    self._close = self._connection.send(event.response())
                    self.closing = True
                    self._start_writing()
                else:  # a frame wsproto could not parse (the code says why)
                    self.close(event.code)
            elif isinstance(event, Message) and not self.closing:
                data = event.data
                self._message_bytes += len(data.encode() if isinstance(data, str) else data)
                if self._message_bytes > self._limits.max_message_bytes:
                    self.too_big = True
                    self.close(MESSAGE_TOO_BIG)
                elif event.message_finished:
                    self._message_bytes = 0
