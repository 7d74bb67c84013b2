"""The task that owns the round state and carries out its effects.

Only this task touches :class:`~.rounds.Round`. RPC handlers send it events on
a trio memory channel (with a one-shot reply channel when they need an
answer). It never waits on the network or the disk itself: broadcasts and
aggregations are spawned into its nursery and report back as new events.
"""

from __future__ import annotations

import functools
import logging
import threading

import trio

from . import broadcast
from .aggregation import AggregationError, Aggregator, Contribution, aggregate
from .config import Settings
from .layout import Layout
from .rounds import (
    Aggregate,
    AggregationDone,
    Broadcast,
    BroadcastDone,
    CheckIn,
    Effect,
    Event,
    Log,
    Reply,
    Round,
    SelectorReported,
    Status,
)
from .status import StatusHub

log = logging.getLogger(__name__)

#: Events waiting for the state task; RPC handlers wait when it is full.
EVENT_BUFFER = 1024


class Coordinator:
    """Round state owner. Use :meth:`check_in` and :meth:`report` from RPC handlers."""

    def __init__(
        self,
        settings: Settings,
        layout: Layout,
        hub: StatusHub,
        aggregator: Aggregator = aggregate,
    ) -> None:
        self._settings = settings
        self._aggregator = aggregator
        self._layout = layout
        self._hub = hub
        self._round = Round(goal=settings.checkin_limit)
        self._events_in, self._events = trio.open_memory_channel[Event](EVENT_BUFFER)

    async def check_in(self, selector: str) -> bool:
        """One client at ``selector``: may it be kept for the round?"""
        reply_in, reply_out = trio.open_memory_channel[bool](1)
        async with reply_out:
            await self._events_in.send(CheckIn(selector, reply_to=reply_in))
            return await reply_out.receive()

    async def report(self, selector: str) -> None:
        """``selector`` wrote its aggregate files."""
        await self._events_in.send(SelectorReported(selector))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._hub.publish(self._round.status())
            log.info("round %d: selection open (goal %d)", self._round.number, self._round.goal)
            task_status.started()
            async for event in self._events:
                for effect in self._round.handle(event):
                    self._execute(effect, nursery)

    def _execute(self, effect: Effect, nursery: trio.Nursery) -> None:
        match effect:
            case Reply(reply_to=reply_to, accepted=accepted):
                try:
                    reply_to.send_nowait(accepted)  # type: ignore[attr-defined]
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    log.warning(
                        "a selector gave up waiting for its check-in answer (%s)",
                        "accepted" if accepted else "refused",
                    )
            case Status():
                self._hub.publish(effect)
            case Log(level=level, message=message):
                log.log(logging.getLevelName(level), message)
            case Broadcast(round=number, selectors=selectors):
                for selector in selectors:
                    nursery.start_soon(self._tell, number, selector)
            case Aggregate(round=number, selectors=selectors):
                nursery.start_soon(self._aggregate, number, selectors)

    async def _tell(self, number: int, selector: str) -> None:
        error: str | None = None
        try:
            with trio.fail_after(self._settings.goal_count_timeout):
                await broadcast.goal_count_reached(selector)
        except Exception as exc:
            error = broadcast.describe(exc)
        await self._events_in.send(BroadcastDone(number, selector, error))

    async def _aggregate(self, number: int, selectors: tuple[str, ...]) -> None:
        contributions = [
            Contribution(s, self._layout.agg_checkpoint(s), self._layout.agg_weight(s))
            for s in selectors
        ]
        cancel = threading.Event()
        job = functools.partial(
            self._aggregator, self._layout.checkpoint, contributions, self._layout.tmp, cancel
        )
        try:
            result = await trio.to_thread.run_sync(job, abandon_on_cancel=True)
        except AggregationError as exc:
            done = AggregationDone(number, error=str(exc))
        except Exception as exc:
            log.exception("round %d: aggregation crashed", number)
            done = AggregationDone(number, error=f"internal error: {type(exc).__name__}: {exc}")
        else:
            log.info(
                "round %d: averaged %d arrays from %d selector(s), total weight %d, %.1f MB read",
                number,
                result.arrays,
                len(selectors),
                result.total_weight,
                result.bytes_read / 1e6,
            )
            done = AggregationDone(number, seconds=result.seconds)
        finally:
            cancel.set()
        await self._events_in.send(done)
