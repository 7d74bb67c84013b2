"""The hub that numbers status messages and fans them out to subscribers.

Each message (:mod:`.schema`) is a complete snapshot of the round (not a
delta), so a subscriber that misses some still knows the whole state from the
next one.
That is what makes the delivery policy safe: every subscriber has its own
bounded queue, and when it is full the *oldest* message is dropped. Publishing
never waits on a subscriber, so a slow or stuck webserver cannot delay the
round or the other subscribers; it only loses intermediate snapshots, and
always receives the latest one.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Protocol, TypeVar

import trio
from wsproto.frame_protocol import FrameProtocol

from ..core.events import Status
from .schema import StatusMessage, phase_name, timestamp, to_message, utc_now

__all__ = ["Published", "Sink", "StatusHub", "Subscription"]

#: Messages a subscriber may fall behind before the oldest are dropped.
_QUEUE_LENGTH = 64


class Published:
    """A status message as published: the object, and its JSON text.

    The text is made at most once per change, not once per subscriber (with a
    thousand websocket subscribers, a thousand fewer ``json.dumps``), and only
    if some subscriber sends it: a check-in with nobody watching pays nothing.
    """

    def __init__(self, message: StatusMessage) -> None:
        self.message = message

    @functools.cached_property
    def text(self) -> str:
        return json.dumps(self.message)

    @functools.cached_property
    def frame(self) -> bytes:
        """The text as one websocket text frame, server to client (RFC 6455, 5.2).

        A server's frames are not masked and we negotiate no extension, so
        these same bytes go to every subscriber: framed once per change.
        """
        return bytes(FrameProtocol(client=False, extensions=[]).send_data(self.text, fin=True))


class Sink(Protocol):
    """What the hub hands each message to; ``put`` must not block or raise."""

    def put(self, published: Published) -> None: ...


class Subscription:
    """One subscriber's bounded queue (oldest dropped when full)."""

    def __init__(self, maxlen: int) -> None:
        self._queue: collections.deque[Published] = collections.deque(maxlen=maxlen)
        self._wake = trio.Event()
        self.dropped = 0

    def put(self, published: Published) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(published)
        self._wake.set()

    async def next(self) -> Published:
        """The oldest message not yet taken; waits for one if there is none."""
        while not self._queue:
            await self._wake.wait()
            self._wake = trio.Event()
        return self._queue.popleft()

    async def get(self) -> StatusMessage:
        return (await self.next()).message

    def take_ready(self) -> list[Published]:
        """Every message waiting, without waiting (for a reader that must be current now)."""
        ready = list(self._queue)
        self._queue.clear()
        return ready


_S = TypeVar("_S", bound=Sink)


class StatusHub:
    """Numbers, timestamps and fans out status snapshots; never blocks the publisher."""

    def __init__(
        self,
        problem_id: str,
        checkpoint: str,
        clock: Callable[[], datetime] = utc_now,
        queue_length: int = _QUEUE_LENGTH,
    ) -> None:
        self._problem_id = problem_id
        self._checkpoint = checkpoint
        self._clock = clock
        self._queue_length = queue_length
        self._seq = itertools.count(1)
        self._subscribers: set[Sink] = set()
        self._latest: Published | None = None
        self._round = 0
        self._stages: dict[str, str] = {}  # this round's stages -> when each began
        self._observers: list[Callable[[StatusMessage], None]] = []

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def latest(self) -> StatusMessage | None:
        """The last message published (None before the first)."""
        return self._latest.message if self._latest is not None else None

    def observe(self, observer: Callable[[StatusMessage], None]) -> None:
        """Call ``observer`` with every message as it is published (it must not block).

        For who must see every message (the round history), where a subscriber
        may lose intermediate ones.
        """
        self._observers.append(observer)

    def publish(self, status: Status) -> StatusMessage:
        now = timestamp(self._clock())
        if status.round != self._round:
            self._round, self._stages = status.round, {}
        # A stage begins with its first snapshot; it is never restarted within a round.
        self._stages.setdefault(status.stage.name, now)
        self._stages.setdefault(phase_name(status), now)
        message = to_message(
            status,
            problem_id=self._problem_id,
            seq=next(self._seq),
            time=now,
            checkpoint=self._checkpoint,
            stages=self._stages,
        )
        self._latest = Published(message)
        for observer in self._observers:
            observer(message)

        for subscription in self._subscribers:
            subscription.put(self._latest)
        return message

    @property
    def queue_length(self) -> int:
        """Messages a subscriber may fall behind before the oldest are dropped."""
        return self._queue_length

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """A subscription that starts with the current status, then every new message."""
        with self.attach(Subscription(self._queue_length)) as subscription:
            yield subscription

    @contextlib.contextmanager
    def attach(self, sink: _S) -> Iterator[_S]:
        """Hand ``sink`` the current status, then every new message, until the block ends.

        For a subscriber that delivers a message as it is published when it
        can (the websocket stream writes it at once), and keeps its own
        bounded queue, at most :attr:`queue_length` long, when it cannot.
        """
        if self._latest is not None:
            sink.put(self._latest)
        self._subscribers.add(sink)
        try:
            yield sink
        finally:
            self._subscribers.discard(sink)
