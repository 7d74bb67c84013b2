"""The task that owns the round state and carries out its effects.

Only this task touches :class:`~.core.rounds.Round`. RPC handlers send it
events on a trio memory channel (with a one-shot answer slot when they need
an answer). It never waits on the network or the disk itself: broadcasts,
validations and aggregations are spawned into its nursery and report back as
new events. What it does to the outside world is handed to it by the
composition root (:mod:`.app`): the problem folder (a
:class:`~.storage.round_files.RoundFiles`), the function that tells a
selector to configure, the retry policy and, if completed rounds are
evaluated, the :class:`~.evaluation.Evaluator`; it builds no TLS context
and dials nothing by itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Collection
from dataclasses import dataclass
from typing import Generic, NamedTuple, Protocol, TypeVar

import trio

from .core.events import (
    Aggregate,
    AggregationDone,
    Answer,
    AnswerRelease,
    AnswerReport,
    Arm,
    Broadcast,
    BroadcastDone,
    CheckIn,
    ContributionValidated,
    Effect,
    Evaluate,
    Evaluated,
    Event,
    Log,
    Refused,
    Release,
    SelectorReported,
    Status,
    StillWaiting,
    Unchecked,
    Validate,
    WindowClosed,
    Withdrawn,
)
from .core.privacy import Spent
from .core.rounds import Round, Rules
from .core.stages import Stage
from .core.stopping import RoundMetrics
from .errors import (
    AggregationError,
    ContributionError,
    ContributionsRefused,
    OutOfResources,
    short_reason,
)
from .evaluation import Evaluator
from .log_throttle import Throttle
from .logs import log_context
from .retry import RetryPolicy
from .status.hub import StatusHub
from .status.schema import utc_now
from .storage.journal import Entry
from .storage.round_files import RoundFiles
from .storage.untrusted import clip
from .untrusted_text import shown

__all__ = ["Admission", "Coordinator", "Tell"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Events waiting for the state task; RPC handlers wait when it is full.
_EVENT_BUFFER = 1024

#: Longest reason kept for a failure of the coordinator's own files (paths can be long).
_OWN_REASON_CHARS = 2000

#: A stage that lasts is said in the log after this long, then after twice as long since
#: the last line, up to every _PROGRESS_MAX seconds: an idle coordinator is not silent for
#: hours, and not noisy either.
_PROGRESS_FIRST = 60.0
_PROGRESS_MAX = 1800.0

#: How long a stopping coordinator waits for an evaluation's files to be tidied.
_CLEANUP_SECONDS = 5.0

#: Within one phase (round, stage, aggregating, round of the last metrics: see _phase;
#: new metrics are a new phase), snapshots that only change counts are
#: published at most once per this many seconds; the latest is published when the time
#: is up. Each snapshot lists every selector taking part, so publishing one per report
#: made a round of N selectors cost O(N**2) bytes of JSON (340 kB at 100, 13.8 MB at
#: 500); a dashboard needs no more than ten updates a second. A change of
#: phase is published at once.
_COUNTS_EVERY = 0.1


#: The metrics' round in a phase without metrics (so the initial model's, of round 0, are new).
_NO_METRICS = -1


def _phase(status: Status) -> tuple[int, Stage, bool, int]:
    """What a status snapshot is a snapshot of: round, stage, aggregating or not, and the
    round of the last metrics (new metrics are journaled, and never collapsed away)."""
    metrics = status.metrics.round if status.metrics is not None else _NO_METRICS
    return status.round, status.stage, status.aggregating, metrics


def _publish_first(
    held: Status, status: Status, published: tuple[int, Stage, bool, int] | None
) -> bool:
    """Whether ``held``, a snapshot not yet published, must be before ``status`` replaces
    it: it is of another round, stage or aggregation state, or it carries metrics that
    neither ``status`` nor the last snapshot published (of phase ``published``) carries."""
    (*where, metrics), (*where_next, metrics_next) = _phase(held), _phase(status)
    shown = published[3] if published is not None else _NO_METRICS
    return where != where_next or metrics not in (metrics_next, shown)


class Tell(Protocol):
    """Tells one selector (its id) to configure its clients; raises if it could not.

    :meth:`run` holds its connections (the round task runs it); :meth:`retain`
    closes those of selectors not in a round (see :mod:`.rpc.goal_count`).
    """

    async def __call__(self, selector: str, /) -> None: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...

    def retain(self, selectors: Collection[str], /) -> None: ...


class Admission(NamedTuple):
    """The round's answer to a check-in: how many clients it accepted, and its number.

    A named tuple, not a dataclass: one is made per check-in, the hot path.
    """

    accepted: int
    round: int


class _AnswerSlot:
    """The one-shot answer slot of a call: set once by the round task, read by the caller.

    Lighter than a memory channel per call (check-ins are the hot path: see
    ``scripts/bench --parts checkin``); ``waiting`` turns False when the caller
    stopped waiting, so an answer nobody will read is logged. ``value`` is the
    answer's count (clients accepted or released) or, for a report, 1 if taken.
    """

    __slots__ = ("ready", "round", "value", "waiting")

    def __init__(self) -> None:
        self.value = 0
        self.round = 0
        self.ready = trio.Event()
        self.waiting = True

    async def ask(self, events: trio.MemorySendChannel[Event], event: Event) -> None:
        """Send ``event`` (which names this slot) and wait for its answer."""
        try:
            await events.send(event)
            await self.ready.wait()
        finally:
            self.waiting = False

    def answer(self, value: int, round: int = 0) -> None:
        self.value, self.round = value, round
        self.ready.set()


@dataclass(frozen=True)
class _Done(Generic[T]):
    value: T


@dataclass(frozen=True)
class _Failed:
    reason: str


#: What came of work on files: its value, or why it failed (a reason for a person).
_Outcome = _Done[T] | _Failed


async def _outcome(work: Awaitable[T], what: str) -> _Outcome[T]:
    """Await ``work``; an AggregationError is an expected, specific failure; anything
    else is a bug, logged with its traceback, and reported as an internal error.

    Reasons are cut and escaped (they quote files a selector wrote).
    ContributionsRefused and OutOfResources are raised: the caller knows what to do
    with them.
    """
    try:
        return _Done(await work)
    except (ContributionsRefused, OutOfResources):
        raise
    except ContributionError as error:  # quotes a selector's files: a few hundred characters
        return _Failed(clip(str(error)))
    except AggregationError as error:  # our own files: long paths, and what to do
        return _Failed(shown(str(error), _OWN_REASON_CHARS))
    except Exception as error:
        log.exception("%s crashed", what)
        return _Failed(clip(f"internal error: {type(error).__name__}: {error}"))


class Coordinator:
    """Round state owner. Use :meth:`check_in`, :meth:`report`, :meth:`refused` from RPC handlers.

    ``tell(selector)`` sends ``GoalCountReached`` (it sets its own time limit
    per call and bounds the calls in flight); ``retry`` says how often a failed
    ``tell`` is tried again before the selector is dropped from the round.
    ``first_round``, ``metrics`` (the last evaluated round's) and ``privacy``
    (spent under differential privacy) are where the run stood; ``evaluator``
    evaluates each completed round (needed when the rules say so).
    """

    def __init__(
        self,
        rules: Rules,
        files: RoundFiles,
        hub: StatusHub,
        *,
        tell: Tell,
        retry: RetryPolicy,
        first_round: int = 1,
        metrics: RoundMetrics | None = None,
        evaluator: Evaluator | None = None,
        privacy: Spent | None = None,
    ) -> None:
        self.alive = False  # the round task runs (for the health check)
        self._files = files
        self._hub = hub
        self._tell_one = tell
        self._retry = retry
        self._evaluator = evaluator
        self._round = Round(rules, number=first_round, metrics=metrics, privacy=privacy)
        self._journaled: tuple[int, Stage, bool, int] | None = None
        self._held: Status | None = None  # the latest snapshot, not yet published
        self._shown_at = -math.inf  # when the last snapshot (of phase _journaled) was published
        self._flushing = False  # a task will publish what is held when _COUNTS_EVERY is up
        self._windows: dict[Stage, trio.CancelScope] = {}
        self._progress = trio.CancelScope()  # the progress lines of the current stage
        self._validations: dict[int, list[trio.CancelScope]] = {}  # by round, to cancel
        self._nursery: trio.Nursery | None = None
        self._events_in, self._events = trio.open_memory_channel[Event](_EVENT_BUFFER)
        self._repeats = Throttle(log)  # lines peers can repeat at will

    async def check_in(self, selector: str, clients: int = 1) -> Admission:
        """``clients`` (>= 1) clients wait at ``selector``: how many may it keep, in which round?"""
        slot = _AnswerSlot()  # the hot path: ask() written out
        try:
            await self._events_in.send(CheckIn(selector, reply_to=slot, clients=clients))
            await slot.ready.wait()
        finally:
            slot.waiting = False
            if not slot.ready.is_set():
                await self._withdraw(selector, slot)
        return Admission(slot.value, slot.round)

    async def _withdraw(self, selector: str, slot: _AnswerSlot) -> None:
        """The caller is gone (its connection closed) before its answer: if the round holds
        the check-in (it is aggregating), it must not admit clients nobody holds."""
        gone = contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError)
        with trio.CancelScope(shield=True), gone:  # the caller's task is being cancelled
            await self._events_in.send(Withdrawn(selector, slot))

    async def release(self, selector: str, clients: int, round: int) -> int:
        """``selector`` let go ``clients`` clients of round ``round``: how many are un-counted?"""
        slot = _AnswerSlot()
        await slot.ask(self._events_in, Release(selector, slot, clients, round))
        return slot.value

    async def report(self, selector: str) -> None:
        """``selector`` wrote its aggregate files (the old wire: for no particular round)."""
        await self._events_in.send(SelectorReported(selector))

    async def report_round(self, selector: str, round: int) -> bool:
        """``selector`` wrote its aggregate files for round ``round``: is that taken?"""
        slot = _AnswerSlot()
        await slot.ask(self._events_in, SelectorReported(selector, round, reply_to=slot))
        return bool(slot.value)

    @property
    def storage_error(self) -> str | None:
        """Why the coordinator's own files cannot be written now (None: they can)."""
        return self._files.journal.failure

    async def refused(self, selector: str, reason: str) -> None:
        """The RPC layer refused a call from ``selector``: shown in the status stream."""
        await self._events_in.send(Refused(selector, reason))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        evaluating = self._evaluator.running() if self._evaluator else contextlib.nullcontext()
        try:
            async with self._files.running(), evaluating, trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._files.journal.run)
                await nursery.start(self._tell_one.run)
                nursery.start_soon(self._repeats.run)
                with log_context(round=self._round.number):
                    for effect in self._round.start():
                        self._execute(effect, nursery)
                self._publish_held()
                if self._evaluator is not None:
                    nursery.start_soon(self._evaluate_current)
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
            case Answer():  # the hot path: no sub-patterns to match
                self._answer(effect.reply_to, effect.accepted, effect.round)
            case AnswerRelease(reply_to=slot, released=released):
                self._answer(slot, released)
            case AnswerReport(reply_to=slot, taken=taken):
                self._answer(slot, int(taken))
            case Status():
                if effect.stage in (Stage.COMPLETED, Stage.FAILED):
                    self._end_validations(effect.round)
                # A snapshot held back (to the end of this step, or for _COUNTS_EVERY:
                # see _publish_held) is replaced by the next one of the same round,
                # stage and aggregation state: each is the whole state, so subscribers
                # lose only intermediate counts, and a burst of check-ins or reports
                # costs one message, not one each. New metrics replace it too (their
                # snapshot carries the newer counts, and is published at the end of the
                # step), unless it holds metrics of its own not yet published.
                if self._held is not None and _publish_first(self._held, effect, self._journaled):
                    self._publish(self._held)
                self._held = effect
            case Log(level=level, message=message, kind=""):
                log.log(logging.getLevelName(level), message)
            case Log(level=level, message=message, kind=kind, selector=selector):
                self._repeats.log(logging.getLevelName(level), kind, "%s", message, peer=selector)
            case Broadcast(round=number, selectors=selectors):
                self._tell_one.retain(selectors)  # a channel per selector taking part
                for selector in selectors:
                    nursery.start_soon(self._tell, number, selector)
                nursery.start_soon(self._files.warm)  # reports will follow
            case Aggregate(round=number, selectors=selectors):
                self._end_validations(number)  # those not finished are no longer waited for
                nursery.start_soon(self._aggregate, number, selectors)
            case Evaluate(round=number):
                nursery.start_soon(self._evaluate, number)
            case Validate(round=number, selector=selector):
                scope = trio.CancelScope()
                self._validations.setdefault(number, []).append(scope)
                nursery.start_soon(self._validate, scope, number, selector)
            case Arm(round=number, stage=stage, seconds=seconds):
                if stage in self._windows:
                    self._windows[stage].cancel()
                self._windows[stage] = trio.CancelScope()
                nursery.start_soon(self._window, self._windows[stage], number, stage, seconds)

    def _answer(self, slot: object, value: int, number: int = 0) -> None:
        """Hand the round's answer to the caller waiting at ``slot``."""
        assert isinstance(slot, _AnswerSlot)
        if not slot.waiting:  # a peer can make this happen at will: counted, not each logged
            self._repeats.warning(
                "answers nobody waited for",
                "a selector gave up waiting for the round's answer (%d)",
                value,
                peer="",
            )
        slot.answer(value, number)

    def _publish_held(self) -> None:
        """At the end of a step, publish the snapshot held back (see ``_execute``), unless
        it only changes the counts of a phase published less than _COUNTS_EVERY ago: then
        a task publishes the latest one when that time is up."""
        if self._held is None:
            return
        if _phase(self._held) == self._journaled:  # the phase of the last one published
            wait = self._shown_at + _COUNTS_EVERY - trio.current_time()
            if wait > 0:
                if not self._flushing:
                    assert self._nursery is not None
                    self._flushing = True
                    self._nursery.start_soon(self._flush_after, wait)
                return
        self._publish(self._held)
        self._held = None

    async def _flush_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        self._flushing = False
        self._publish_held()

    def _publish(self, status: Status) -> None:
        self._hub.publish(status)
        # Once the hub has stamped the message: the next one of its phase then carries a
        # time at least _COUNTS_EVERY later, even if a thread held the loop up between the
        # two clocks (taken before the stamp: 97 ms apart at 2,000 selectors).
        self._shown_at = trio.current_time()
        if _phase(status) != self._journaled:
            self._stage_changed(status)

    def _stage_changed(self, status: Status) -> None:
        """Queue a journal entry and restart the progress lines; never waits."""
        self._journaled = _phase(status)
        self._progress.cancel()
        self._progress = trio.CancelScope()
        assert self._nursery is not None
        self._nursery.start_soon(self._say_progress, self._progress, status.round)
        entry = Entry(
            round=status.round,
            stage=status.stage.name,
            aggregating=status.aggregating,
            selectors=list(status.selectors),
            reported=list(status.reported),
            time=utc_now().isoformat(),
            metrics=status.metrics.as_dict() if status.metrics is not None else None,
            finished=status.finished,
        )
        self._files.journal.submit(entry)

    async def _say_progress(self, scope: trio.CancelScope, number: int) -> None:
        """StillWaiting after _PROGRESS_FIRST seconds in a stage, then at doubling intervals."""
        with scope:
            waited, delay = 0.0, _PROGRESS_FIRST
            while True:
                await trio.sleep(delay)
                waited += delay
                await self._events_in.send(StillWaiting(number, waited))
                delay = min(2 * delay, _PROGRESS_MAX)

    async def _window(
        self, scope: trio.CancelScope, number: int, stage: Stage, seconds: float
    ) -> None:
        with scope:
            await trio.sleep(seconds)
            await self._events_in.send(WindowClosed(number, stage))

    async def _tell(self, number: int, selector: str) -> None:
        """GoalCountReached to one selector, retried by the policy; the outcome is an event."""
        with log_context(round=number, selector=selector):
            try:
                await self._retry.call(
                    lambda: self._tell_one(selector),
                    on=Exception,
                    what=f"round {number}: GoalCountReached to {selector}",
                )
            except Exception as error:
                outcome: str | None = short_reason(error)
            else:
                outcome = None
        await self._events_in.send(BroadcastDone(number, selector, outcome))

    def _end_validations(self, number: int) -> None:
        """Stop the validations of round ``number``; forget what older rounds' found."""
        for scope in self._validations.pop(number, ()):
            scope.cancel()
        self._files.forget_before(number)

    async def _validate(self, scope: trio.CancelScope, number: int, selector: str) -> None:
        """Validate ``selector``'s files (in a worker process); tell the round what was found."""
        with scope, log_context(round=number, selector=selector):
            try:
                outcome = await _outcome(
                    self._files.validate(number, selector), f"round {number}: validating {selector}"
                )
            except OutOfResources as error:  # not the selector's fault: the round's
                await self._events_in.send(
                    Unchecked(number, selector, shown(str(error), _OWN_REASON_CHARS))
                )
                return
            if isinstance(outcome, _Failed):
                event = ContributionValidated(number, selector, outcome.reason)
            else:
                found = outcome.value
                norm = None if found.square_norm is None else math.sqrt(found.square_norm)
                event = ContributionValidated(number, selector, weight=found.weight, norm=norm)
            await self._events_in.send(event)

    async def _evaluate_current(self) -> None:
        """At start-up: evaluate the checkpoint in place, unless its metrics are known (it
        is the initial model's on a new problem, and warms the evaluation worker up)."""
        number = await self._files.keep_current_for_evaluation()
        known = self._round.metrics
        if number is None or (known is not None and known.round >= number):
            if number is not None:
                await self._files.evaluated(number, None)
            return
        await self._evaluate(number)

    async def _evaluate(self, number: int) -> None:
        """Evaluate round ``number``'s checkpoint (in the evaluator's worker process); keep
        the metrics beside that checkpoint; tell the round."""
        assert self._evaluator is not None, "rules that evaluate need an evaluator"
        with log_context(round=number, selector=None):
            outcome: dict[str, float] | str = "the coordinator stopped"
            try:
                outcome = await self._evaluator.evaluate(
                    number, self._files.evaluation_copy(number)
                )
            finally:
                # Its copy of the checkpoint is removed even on shutdown (a restart would too).
                with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_SECONDS):
                    await self._files.evaluated(
                        number, None if isinstance(outcome, str) else outcome
                    )
            if isinstance(outcome, str):
                event = Evaluated(number, error=outcome)
            else:
                event = Evaluated(number, tuple(outcome.items()))
            await self._events_in.send(event)

    async def _aggregate(self, number: int, selectors: tuple[str, ...]) -> None:
        with log_context(round=number, selector=None):
            try:
                outcome = await _outcome(
                    self._files.aggregate(number, selectors), f"round {number}: aggregation"
                )
            except ContributionsRefused as refused:  # files changed since their validation
                rejected = tuple((s, clip(why)) for s, why in refused.reasons.items())
                privacy, unaccounted = await self._privacy_spent(number)
                await self._events_in.send(
                    AggregationDone(
                        number, rejected=rejected, privacy=privacy, unaccounted=unaccounted
                    )
                )
                return
            privacy, unaccounted = await self._privacy_spent(number)
            if isinstance(outcome, _Failed):
                await self._events_in.send(
                    AggregationDone(
                        number, error=outcome.reason, privacy=privacy, unaccounted=unaccounted
                    )
                )
                return
            result = outcome.value
            log.info(
                "round %d: averaged %d arrays from %d selector(s), total weight %d, %.1f MB read",
                number,
                result.arrays,
                len(selectors),
                result.total_weight,
                result.bytes_read / 1e6,
            )
            await self._events_in.send(
                AggregationDone(
                    number, seconds=result.seconds, privacy=privacy, unaccounted=unaccounted
                )
            )

    async def _privacy_spent(self, number: int) -> tuple[Spent | None, str | None]:
        """The privacy spent after round ``number`` was (perhaps) released (None if DP is
        off), or why the accountant could not say (logged; with DP_MAX_EPSILON set the run
        then ends: an unknown spending fails closed)."""
        outcome = await _outcome(self._files.privacy_spent(), f"round {number}: accounting")
        if isinstance(outcome, _Failed):
            log.error("round %d: the privacy spent cannot be computed: %s", number, outcome.reason)
            return None, outcome.reason
        return outcome.value, None
