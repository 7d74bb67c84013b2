"""Optional legacy status push (``LEGACY_STATUS_PUSH``): stage changes as the Go system had them.

The Go coordinator told its webserver each stage of a round with gRPC calls
``FlStatus/RoundStatus(FlRoundStatus{stage, roundNo})`` (``fl_status.proto``)
to ``WEBSERVER_ADDRESS`` (the published fedota/fl-webserver never had the
receiving end: the contract is the proto and those calls). This module makes them,
as a subscriber of the :class:`~.hub.StatusHub` like the websocket and the
webhook, so a webserver that is down or slow never delays a round:

- :func:`stage_changes` turns status snapshots into the pushes they imply:
  each wire stage (``SELECTION``, ``CONFIGURATION``, ``REPORTING``,
  ``COMPLETED``) of each round once, in order; a stage that snapshots skipped
  (the hub dropped them) is filled in when a later one implies it. ``FAILED``
  and ``FINISHED`` have no value in the proto and are not pushed.
- ``roundNo`` is the Go numbering, from 0: round ``N`` of the status stream
  (and the logs and the journal) is ``roundNo = N - 1``.
- Pushes wait in a bounded queue (:data:`QUEUE_LENGTH`); when it is full the
  *oldest* is dropped (a webserver back from an outage gets the latest stages,
  in order), and drops are logged at most once a minute with their count.
- Each push is one call on a connection of its own (as the Go coordinator
  made them) with a time limit; a failed push is tried again, with the
  coordinator's one :class:`~fl_coordinator.retry.RetryPolicy`, until it is
  delivered or the queue drops it. A push whose answer did not come in time
  is sent again, so a webserver slower than the time limit may see it twice.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .._proto import fl_status_grpc, fl_status_pb2
from ..log_throttle import Throttle
from ..retry import RetryPolicy
from ..rpc.addresses import call_once
from .hub import StatusHub
from .schema import StatusMessage

__all__ = ["PUSH_TIMEOUT", "QUEUE_LENGTH", "LegacyStatus", "run_legacy_push", "stage_changes"]

log = logging.getLogger(__name__)

#: Seconds a push may take (connecting, the call, closing) before it counts as failed.
PUSH_TIMEOUT = 5.0

#: Pushes waiting at most: 16 whole rounds of 4 stages.
QUEUE_LENGTH = 64

#: Waits from 0.5 s, doubling to one a minute: a webserver that is down costs one log line
#: a minute (stamina's retry hook), and one back up is told within a minute.
_DEFAULT_RETRY = RetryPolicy(attempts=None, first_wait=0.5, max_wait=60.0)

#: fl_status.proto's stages by name; their values are in the order a round goes through them.
_WIRE_STAGES: dict[str, int] = dict(fl_status_pb2.Stages.items())


@dataclass(frozen=True)
class LegacyStatus:
    """One push: ``FlRoundStatus{stage, roundNo}`` (``stage`` an ``fl_status_pb2.Stages``)."""

    stage: int
    round_no: int

    def __str__(self) -> str:
        return f"{fl_status_pb2.Stages.Name(self.stage)} of roundNo {self.round_no}"


def stage_changes(last: LegacyStatus | None, message: StatusMessage) -> list[LegacyStatus]:
    """The pushes that status ``message`` implies after ``last`` (the previous push), in order.

    A round goes through the wire stages in their order, so a later stage
    implies the earlier ones of its round, and a new round implies its
    ``SELECTION``: those not pushed yet come first. A message of the same
    stage as ``last`` (a check-in, a report), of an earlier stage or round, or
    of a stage the proto does not have (``FAILED``, ``FINISHED``) implies none.
    """
    stage = _WIRE_STAGES.get(message["stage"])
    round_no = message["round"] - 1
    if stage is None or round_no < 0:
        return []
    first = _WIRE_STAGES["SELECTION"]
    if last is not None and last.round_no > round_no:
        return []
    if last is not None and last.round_no == round_no:
        first = last.stage + 1
    return [LegacyStatus(s, round_no) for s in range(first, stage + 1)]


class _Pending:
    """The pushes not delivered yet, oldest first; the oldest is dropped when it is full.

    The push being tried stays at the head until it is delivered, so the queue
    may drop it too (after an outage, the webserver gets the latest stages).
    """

    def __init__(self, maxlen: int) -> None:
        self._queue: collections.deque[LegacyStatus] = collections.deque(maxlen=maxlen)
        self._wake = trio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, push: LegacyStatus) -> LegacyStatus | None:
        """Queue ``push``; return the push dropped to make room, if one was."""
        dropped = self._queue[0] if len(self._queue) == self._queue.maxlen else None
        self._queue.append(push)
        self._wake.set()
        return dropped

    async def head(self) -> LegacyStatus:
        """The oldest push, left in the queue; waits for one if there is none."""
        while not self._queue:
            await self._wake.wait()
            self._wake = trio.Event()
        return self._queue[0]

    def is_head(self, push: LegacyStatus) -> bool:
        return bool(self._queue) and self._queue[0] is push

    def delivered(self, push: LegacyStatus) -> None:
        if self.is_head(push):
            self._queue.popleft()


class _Dropped(Exception):
    """The push being tried was dropped from the queue: stop trying it."""


def _retried(error: BaseException) -> bool:
    """Any failure of a push but its drop (stamina hands the predicate cancellations too)."""
    return isinstance(error, Exception) and not isinstance(error, _Dropped)


@dataclass
class _LegacyPush:
    address: str
    retry: RetryPolicy
    limit: float  # seconds per push
    pending: _Pending
    throttle: Throttle
    dropped: Callable[[], None]

    async def follow(self, hub: StatusHub, task_status: trio.TaskStatus[None]) -> None:
        """Queue the pushes the hub's messages imply, at once (never waits on the webserver)."""
        last: LegacyStatus | None = None
        with hub.subscribe() as subscription:
            task_status.started()
            while True:
                for push in stage_changes(last, await subscription.get()):
                    last = push
                    if (dropped := self.pending.add(push)) is not None:
                        self.dropped()
                        self._log_drop(dropped)

    def _log_drop(self, dropped: LegacyStatus) -> None:
        self.throttle.warning(
            "legacy status push: queue full, oldest stage changes dropped",
            "legacy status push to %s: %d stage changes waiting, dropped the oldest (%s)",
            self.address,
            len(self.pending),
            dropped,
            peer="",
        )

    async def deliver(self) -> None:
        """Push the queue's head until it is delivered or dropped, then the next, forever."""
        while True:
            push = await self.pending.head()
            try:
                await self.retry.call(
                    functools.partial(self._push, push),
                    on=_retried,
                    what=f"legacy status push to {self.address}: {push}",
                )
            except _Dropped:
                continue
            self.pending.delivered(push)

    async def _push(self, push: LegacyStatus) -> None:
        if not self.pending.is_head(push):
            raise _Dropped
        request = fl_status_pb2.FlRoundStatus(stage=push.stage, roundNo=push.round_no)
        await call_once(
            self.address,
            lambda channel: fl_status_grpc.FlStatusStub(channel).RoundStatus(request),
            seconds=self.limit,
        )


def _ignore() -> None:
    pass


async def run_legacy_push(
    hub: StatusHub,
    address: str,
    retry: RetryPolicy = _DEFAULT_RETRY,
    *,
    limit: float = PUSH_TIMEOUT,
    queue_length: int = QUEUE_LENGTH,
    dropped: Callable[[], None] = _ignore,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Push the hub's stage changes to the webserver at ``address`` (``host:port``) until
    cancelled; started once subscribed to the hub.

    ``limit``: seconds each push may take. ``dropped()`` is called for each stage
    change the full queue dropped (metrics).
    """
    pusher = _LegacyPush(address, retry, limit, _Pending(queue_length), Throttle(log), dropped)
    log.info("legacy status push to %s on: roundNo is the round number - 1", address)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pusher.throttle.run)
        await nursery.start(pusher.follow, hub)
        nursery.start_soon(pusher.deliver)
        task_status.started()
