"""The task that owns the round state and carries out its effects.

Only this task touches :class:`~.rounds.Round`. RPC handlers send it events on
a trio memory channel (with a one-shot reply channel when they need an
answer). It never waits on the network or the disk itself: broadcasts and
aggregations are spawned into its nursery and report back as new events.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

from .config import Settings
from .core.rounds import (
    Aggregate,
    AggregationDone,
    Arm,
    Broadcast,
    BroadcastDone,
    Check,
    CheckIn,
    ContributionChecked,
    Effect,
    Event,
    Log,
    Refused,
    Reply,
    Round,
    Rules,
    SelectorReported,
    Stage,
    Status,
    WindowClosed,
)
from .log_throttle import Throttle
from .logs import log_context
from .rpc import goal_count as broadcast
from .rpc.tls import selector_client_context
from .status.hub import StatusHub, utc_now
from .storage.aggregation import (
    AggregationError,
    AggregationResult,
    Aggregator,
    Contribution,
    aggregate,
    check_contribution,
)
from .storage.journal import Entry, remember, write_journal
from .storage.layout import Layout

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Events waiting for the state task; RPC handlers wait when it is full.
EVENT_BUFFER = 1024


def _phase(status: Status) -> tuple[int, Stage, bool]:
    """What a status snapshot is a snapshot of: round, stage, aggregating or not."""
    return status.round, status.stage, status.aggregating


class Answer:
    """The one-shot reply slot of a check-in: set once by the round task, read by the caller.

    Lighter than a memory channel per call (check-ins are the hot path: see
    ``scripts/bench --parts checkin``); ``waiting`` turns False when the caller
    stopped waiting, so an answer nobody will read is logged.
    """

    __slots__ = ("accepted", "ready", "waiting")

    def __init__(self) -> None:
        self.accepted = 0
        self.ready = trio.Event()
        self.waiting = True


class Coordinator:
    """Round state owner. Use :meth:`check_in` and :meth:`report` from RPC handlers."""

    def __init__(
        self,
        settings: Settings,
        layout: Layout,
        hub: StatusHub,
        aggregator: Aggregator = aggregate,
        first_round: int = 1,
    ) -> None:
        self._settings = settings
        self._goal_count_tls = selector_client_context(settings)  # ConfigError if unusable
        self.alive = False  # the round task runs (for the health check)
        self._aggregator = aggregator
        self._layout = layout
        self._hub = hub
        self._round = Round(
            Rules(
                goal=settings.checkin_limit,
                selection_timeout=settings.selection_timeout,
                min_checkin_fraction=settings.min_checkin_fraction,
                reporting_timeout=settings.reporting_timeout,
                min_reporting_fraction=settings.min_reporting_fraction,
                allowed=frozenset(settings.allowed_selectors),
                max_selectors=settings.max_selectors_per_round,
            ),
            number=first_round,
        )
        self._journal_in, self._journal = trio.open_memory_channel[Entry](EVENT_BUFFER)
        self._journaled: tuple[int, Stage, bool] | None = None
        self._held: Status | None = None  # the last snapshot of this step, not yet published
        self._windows: dict[Stage, trio.CancelScope] = {}
        self._events_in, self._events = trio.open_memory_channel[Event](EVENT_BUFFER)
        self._repeats = Throttle(log)  # lines peers can repeat at will

    async def check_in(self, selector: str, clients: int = 1) -> int:
        """``clients`` (>= 1) clients wait at ``selector``: how many may it keep for the round?"""
        answer = Answer()
        try:
            await self._events_in.send(CheckIn(selector, reply_to=answer, clients=clients))
            await answer.ready.wait()
        finally:
            answer.waiting = False
        return answer.accepted

    async def report(self, selector: str) -> None:
        """``selector`` wrote its aggregate files."""
        await self._events_in.send(SelectorReported(selector))

    async def refused(self, selector: str, reason: str) -> None:
        """The RPC layer refused a call from ``selector``: shown in the status stream."""
        await self._events_in.send(Refused(selector, reason))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_journal)
                nursery.start_soon(self._repeats.run)
                with log_context(round=self._round.number):
                    for effect in self._round.start():
                        self._execute(effect, nursery)
                self._publish_held()
                self.alive = True
                task_status.started()
                async for event in self._events:
                    self._handle(event, nursery)
                    # What queued up meanwhile is handled in the same step: receive()
                    # yields to the scheduler once per event, so a burst of 16
                    # check-ins cost 16 scheduler passes (bench --parts checkin).
                    while True:
                        try:
                            event = self._events.receive_nowait()
                        except trio.WouldBlock:
                            break
                        self._handle(event, nursery)
                    self._publish_held()
        finally:
            self.alive = False

    def _handle(self, event: Event, nursery: trio.Nursery) -> None:
        # Log lines (and tasks spawned) while handling an event carry its round and selector.
        number = getattr(event, "round", self._round.number)
        with log_context(round=number, selector=getattr(event, "selector", None)):
            for effect in self._round.handle(event):
                self._execute(effect, nursery)

    def _execute(self, effect: Effect, nursery: trio.Nursery) -> None:

        match effect:
            case Reply(reply_to=reply_to, accepted=accepted):
                assert isinstance(reply_to, Answer)
                if not reply_to.waiting:
                    self._repeats.warning(
                        "check-in answers nobody waited for",
                        "a selector gave up waiting for its check-in answer (%d accepted)",
                        accepted,
                        peer="",
                    )
                reply_to.accepted = accepted
                reply_to.ready.set()

            case Status():
                # Within one step, a snapshot followed by another of the same round,
                # stage and aggregation state is replaced by it: each is the whole
                # state, so subscribers lose only intermediate counts, and a burst
                # of check-ins costs one message, not one each.
                if self._held is not None and _phase(self._held) != _phase(effect):
                    self._publish(self._held)
                self._held = effect
            case Log(level=level, message=message, kind=""):
                log.log(logging.getLevelName(level), message)
            case Log(level=level, message=message, kind=kind, selector=selector):
                self._repeats.log(logging.getLevelName(level), kind, "%s", message, peer=selector)
            case Broadcast(round=number, selectors=selectors):
                for selector in selectors:
                    nursery.start_soon(self._tell, number, selector)
            case Aggregate(round=number, selectors=selectors):
                nursery.start_soon(self._aggregate, number, selectors)
            case Check(round=number, selector=selector):
                nursery.start_soon(self._check, number, selector)
            case Arm(round=number, stage=stage, seconds=seconds):
                if stage in self._windows:
                    self._windows[stage].cancel()
                self._windows[stage] = trio.CancelScope()
                nursery.start_soon(self._window, self._windows[stage], number, stage, seconds)

    def _publish_held(self) -> None:
        """Publish the snapshot held back at the end of a step (see ``_execute``)."""
        if self._held is not None:
            self._publish(self._held)
            self._held = None

    def _publish(self, status: Status) -> None:
        self._hub.publish(status)
        self._journal_stage_change(status)

    def _journal_stage_change(self, status: Status) -> None:
        """Queue a journal entry when the stage (or aggregating) changed; never waits."""
        key = _phase(status)
        if key != self._journaled:
            self._journaled = key
            entry = Entry(
                round=status.round,
                stage=status.stage.name,
                aggregating=status.aggregating,
                selectors=list(status.selectors),
                reported=list(status.reported),
                time=utc_now().isoformat(),
            )
            self._journal_in.send_nowait(entry)

    async def _write_journal(self) -> None:
        """The one writer of the journal: entries in order, each fsynced, off the loop."""
        async for entry in self._journal:
            await trio.to_thread.run_sync(write_journal, self._layout, entry)

    async def _window(
        self, scope: trio.CancelScope, number: int, stage: Stage, seconds: float
    ) -> None:
        with scope:
            await trio.sleep(seconds)
            await self._events_in.send(WindowClosed(number, stage))

    async def _tell(self, number: int, selector: str) -> None:
        """GoalCountReached with a time limit per call and retries with back-off."""
        with log_context(round=number, selector=selector):
            await self._tell_with_retries(number, selector)

    async def _tell_with_retries(self, number: int, selector: str) -> None:
        error: str | None = None
        backoff = 1.0
        for attempt in range(self._settings.goal_count_retries + 1):
            if attempt:
                log.warning(
                    "round %d: GoalCountReached to %s failed (%s); retry %d in %.0f s",
                    number,
                    selector,
                    error,
                    attempt,
                    backoff,
                )
                await trio.sleep(backoff)
                backoff *= 2
            try:
                with trio.fail_after(self._settings.goal_count_timeout):
                    await broadcast.goal_count_reached(selector, self._goal_count_tls)
            except Exception as exc:
                error = broadcast.describe(exc)
            else:
                error = None
                break
        await self._events_in.send(BroadcastDone(number, selector, error))

    def _contribution(self, selector: str) -> Contribution:
        layout = self._layout
        return Contribution(selector, layout.agg_checkpoint(selector), layout.agg_weight(selector))

    async def _off_loop(self, job: Callable[[threading.Event], T], what: str) -> T | str:
        """Run ``job`` in a worker thread; return its result, or the error text.

        An AggregationError is an expected, specific message; anything else is
        a bug, logged with its traceback. ``job`` gets an event that is set when
        the coordinator stops waiting (shutdown), so it can stop early.
        """
        cancel = threading.Event()
        try:
            return await trio.to_thread.run_sync(job, cancel, abandon_on_cancel=True)
        except AggregationError as exc:
            return str(exc)
        except Exception as exc:
            log.exception("%s crashed", what)
            return f"internal error: {type(exc).__name__}: {exc}"
        finally:
            cancel.set()

    async def _check(self, number: int, selector: str) -> None:
        contribution = self._contribution(selector)
        with log_context(round=number, selector=selector):
            outcome = await self._off_loop(
                lambda _: check_contribution(self._layout.checkpoint, contribution),
                f"round {number}: checking {selector}",
            )
        error = outcome if isinstance(outcome, str) else None
        await self._events_in.send(ContributionChecked(number, selector, error))

    async def _aggregate(self, number: int, selectors: tuple[str, ...]) -> None:
        with log_context(round=number, selector=None):
            await self._aggregate_round(number, selectors)

    async def _aggregate_round(self, number: int, selectors: tuple[str, ...]) -> None:
        contributions = [self._contribution(s) for s in selectors]

        def job(cancel: threading.Event) -> AggregationResult:
            result = self._aggregator(
                self._layout.checkpoint, contributions, self._layout.tmp, cancel
            )
            remember(self._layout, number, self._settings.keep_checkpoints)
            return result

        result = await self._off_loop(job, f"round {number}: aggregation")
        if isinstance(result, str):
            await self._events_in.send(AggregationDone(number, error=result))
            return
        log.info(
            "round %d: averaged %d arrays from %d selector(s), total weight %d, %.1f MB read",
            number,
            result.arrays,
            len(selectors),
            result.total_weight,
            result.bytes_read / 1e6,
        )
        await self._events_in.send(AggregationDone(number, seconds=result.seconds))
