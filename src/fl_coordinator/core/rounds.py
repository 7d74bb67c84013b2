"""The round state machine: pure, synchronous, no I/O.

In the style of h11's ``Connection``: :class:`Round` takes one event at a time
and returns the effects the I/O layer must carry out (answer an RPC, tell the
selectors, check or average files, arm a timer, publish a status, write a log
line). It never reads a clock, a file or a socket, so every sequence of
events can be replayed in a unit test or thrown at it by Hypothesis. Time
enters only as events: the machine asks for a window with :class:`Arm` and
the I/O layer answers :class:`WindowClosed` when it ends.

Stages within a round only move forward::

    SELECTION --goal reached, or window closed with enough clients--> CONFIGURATION
        --first report--> REPORTING --every selector accounted for--> (aggregation)
        --> COMPLETED | FAILED

and after COMPLETED or FAILED the next round opens in SELECTION with the next
number. A round is abandoned (FAILED, checkpoint untouched) when a window
closes without enough participants, when no selector can be told to
configure, or when the aggregation fails. Check-ins that arrive while a round
is aggregating are held and answered, first come first served, when the next
round's selection opens.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable
from dataclasses import dataclass, field

# -- stages and rules ---------------------------------------------------------


class Stage(enum.Enum):
    """Stage names and values of fl_status.proto's ``Stages``, plus FAILED (ours)."""

    SELECTION = 0
    CONFIGURATION = 1
    REPORTING = 2
    COMPLETED = 3
    FAILED = 4


@dataclass(frozen=True)
class Rules:
    """The goal and the time windows of every round (seconds; 0 = no limit)."""

    goal: int
    selection_timeout: float = 0.0
    min_checkin_fraction: float = 1.0
    reporting_timeout: float = 0.0
    min_reporting_fraction: float = 1.0
    allowed: frozenset[str] = frozenset()  # selector ids that may take part; empty = any
    max_selectors: int = 0  # distinct selectors holding clients in one round; 0 = no limit

    def __post_init__(self) -> None:
        if self.goal < 1:
            raise ValueError(f"goal must be >= 1, got {self.goal}")

    @property
    def min_clients(self) -> int:
        """Clients a selection window must have gathered for the round to go on."""
        return max(1, math.ceil(self.min_checkin_fraction * self.goal))


# -- events (inputs) ----------------------------------------------------------


@dataclass(frozen=True)
class CheckIn:
    """A selector asks to keep ``clients`` clients (1 for ``ClientCountUpdate``, N >= 1 for
    the batched check-in). ``reply_to`` is opaque to the machine."""

    selector: str
    reply_to: Hashable
    clients: int = 1


@dataclass(frozen=True)
class BroadcastDone:
    """The I/O layer finished telling one selector (``error`` after all its retries)."""

    round: int
    selector: str
    error: str | None = None


@dataclass(frozen=True)
class SelectorReported:
    """``SelectorAggregationComplete(selector)`` arrived."""

    selector: str


@dataclass(frozen=True)
class ContributionChecked:
    """The I/O layer checked a reporting selector's files (``error`` if unusable)."""

    round: int
    selector: str
    error: str | None = None


@dataclass(frozen=True)
class WindowClosed:
    """The window armed for ``stage`` of ``round`` ended."""

    round: int
    stage: Stage


@dataclass(frozen=True)
class Refused:
    """The RPC layer refused a call it could not even hand to the round (e.g. a hostile id)."""

    selector: str
    reason: str


@dataclass(frozen=True)
class AggregationDone:
    """The aggregation of ``round`` ended: ``error`` is None when the checkpoint was replaced."""

    round: int
    error: str | None = None
    seconds: float = 0.0


Event = (
    CheckIn | BroadcastDone | SelectorReported | ContributionChecked | WindowClosed
    | AggregationDone | Refused
)  # fmt: skip

#: Ignored or refused calls kept in the status of a round (the most recent ones).
IGNORED_KEPT = 20


# -- effects (outputs) --------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Answer a check-in: how many of the clients it asked for were accepted (0 = refused)."""

    reply_to: Hashable
    accepted: int


@dataclass(frozen=True)
class Broadcast:
    """Send ``GoalCountReached`` to each of ``selectors`` (concurrently, with retries)."""

    round: int
    selectors: tuple[str, ...]


@dataclass(frozen=True)
class Check:
    """Check ``selector``'s aggregate files; answer with ContributionChecked."""

    round: int
    selector: str


@dataclass(frozen=True)
class Aggregate:
    """Average the aggregates of ``selectors`` into the global checkpoint."""

    round: int
    selectors: tuple[str, ...]


@dataclass(frozen=True)
class Arm:
    """Start a window of ``seconds`` for ``stage`` of ``round``; answer with WindowClosed."""

    round: int
    stage: Stage
    seconds: float


@dataclass(frozen=True)
class Status:
    """A snapshot of the round, published to the status stream."""

    round: int
    stage: Stage
    accepted: int
    goal: int
    selectors: tuple[str, ...]
    reported: tuple[str, ...]
    configured: tuple[str, ...] = ()
    unreachable: tuple[str, ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()
    ignored: tuple[tuple[str, str], ...] = ()
    aggregating: bool = False
    held: int = 0
    error: str | None = None
    aggregation_seconds: float | None = None


@dataclass(frozen=True)
class Log:
    """A line for the operator; ``level`` is a :mod:`logging` level name.

    ``kind`` names lines a peer can repeat at will (a refused or ignored
    call), about ``selector``: the coordinator writes them at most once per
    interval and selector, with a count (see :mod:`..log_throttle`).
    """

    level: str
    message: str
    kind: str = ""
    selector: str = ""


Effect = Reply | Broadcast | Check | Aggregate | Arm | Status | Log


# -- the machine --------------------------------------------------------------


@dataclass
class Round:
    """State of the current round and the transition function :meth:`handle`.

    ``selectors`` maps each selector holding accepted clients to how many it
    holds, in the order they first checked in. A selector leaves it when it
    cannot be told to configure (its clients no longer count). A selector
    whose files are unusable stays in ``selectors`` but is ``rejected``: its
    clients count as not reported.
    """

    rules: Rules
    number: int = 1
    stage: Stage = Stage.SELECTION
    accepted: int = 0
    selectors: dict[str, int] = field(default_factory=dict)
    reported: list[str] = field(default_factory=list)
    checking: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    configured: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    aggregating: bool = False
    held: list[CheckIn] = field(default_factory=list)

    @property
    def goal(self) -> int:
        return self.rules.goal

    def status(self, *, error: str | None = None, seconds: float | None = None) -> Status:
        return Status(
            round=self.number,
            stage=self.stage,
            accepted=self.accepted,
            goal=self.goal,
            selectors=tuple(self.selectors),
            reported=tuple(self.reported),
            configured=tuple(self.configured),
            unreachable=tuple(self.unreachable),
            rejected=tuple(self.rejected.items()),
            ignored=tuple(self.ignored),
            aggregating=self.aggregating,
            held=len(self.held),
            error=error,
            aggregation_seconds=seconds,
        )

    def start(self) -> list[Effect]:
        """The effects of opening the current round (call once, before any event)."""
        return [Log("INFO", f"round {self.number}: selection open (goal {self.goal})"),
                self.status(), *self._arm(Stage.SELECTION)]  # fmt: skip

    def handle(self, event: Event) -> list[Effect]:
        """Apply one event; return the effects to carry out, in order."""
        match event:
            case CheckIn():
                return self._check_in(event)
            case SelectorReported():
                return self._reported(event.selector)
            case ContributionChecked():
                return self._checked(event)
            case BroadcastDone():
                return self._broadcast_done(event)
            case WindowClosed():
                return self._window_closed(event)
            case AggregationDone():
                return self._aggregation_done(event)
            case Refused():
                return self._note(event.selector, event.reason, "refused a call from")
        raise TypeError(f"not a round event: {event!r}")

    # -- transitions ----------------------------------------------------------

    def _check_in(self, event: CheckIn) -> list[Effect]:
        if self.rules.allowed and event.selector not in self.rules.allowed:
            return self._refuse(event, "not in ALLOWED_SELECTORS")
        if self.aggregating:
            self.held.append(event)
            return [self.status()]
        if self.stage is not Stage.SELECTION:
            return [Reply(event.reply_to, accepted=0)]
        cap = self.rules.max_selectors
        if cap and event.selector not in self.selectors and len(self.selectors) >= cap:
            return self._refuse(
                event, f"the round already has {cap} selector(s) (MAX_SELECTORS_PER_ROUND)"
            )
        # First come, first served: a batch larger than what the goal has left
        # gets what is left (always >= 1 in SELECTION: reaching the goal configures).
        taken = min(event.clients, self.goal - self.accepted)
        self.accepted += taken
        self.selectors[event.selector] = self.selectors.get(event.selector, 0) + taken
        effects: list[Effect] = [Reply(event.reply_to, accepted=taken)]
        if self.accepted < self.goal:
            effects.append(self.status())
            return effects
        return effects + self._configure(f"goal of {self.goal} reached")

    def _refuse(self, event: CheckIn, why: str) -> list[Effect]:
        return [
            Reply(event.reply_to, accepted=0),
            *self._note(event.selector, f"check-in refused: {why}", "refused a call from"),
        ]

    def _configure(self, why: str) -> list[Effect]:
        self.stage = Stage.CONFIGURATION
        return [
            Log("INFO", f"round {self.number}: {why}; configuring "
                        f"{len(self.selectors)} selector(s)"),
            self.status(),
            Broadcast(self.number, tuple(self.selectors)),
            *self._arm(Stage.REPORTING),
        ]  # fmt: skip

    def _arm(self, stage: Stage) -> list[Effect]:
        seconds = {
            Stage.SELECTION: self.rules.selection_timeout,
            Stage.REPORTING: self.rules.reporting_timeout,
        }[stage]
        return [Arm(self.number, stage, seconds)] if seconds > 0 else []

    def _ignore(self, selector: str, why: str) -> list[Effect]:
        return self._note(selector, why, "ignored report from")

    def _note(self, selector: str, why: str, what: str) -> list[Effect]:
        """Keep a call that changed nothing in the status (bounded) and log it."""
        self.ignored = [*self.ignored, (selector[:300], why)][-IGNORED_KEPT:]
        line = f"round {self.number}: {what} {selector!r}: {why}"
        kind = f"{what.removesuffix(' from')}: {why.partition(':')[0]}"  # our words, not the id
        return [Log("WARNING", line, kind=kind, selector=selector), self.status()]

    def _reported(self, selector: str) -> list[Effect]:
        if self.rules.allowed and selector not in self.rules.allowed:
            return self._ignore(selector, "not in ALLOWED_SELECTORS")
        if self.aggregating:
            return self._ignore(selector, "round is aggregating, no report expected")
        if self.stage not in (Stage.CONFIGURATION, Stage.REPORTING):
            return self._ignore(selector, f"round is in {self.stage.name}, no report expected")
        if selector not in self.selectors:
            return self._ignore(selector, "not a selector of this round")
        if selector in self.reported or selector in self.checking or selector in self.rejected:
            return self._ignore(selector, "it already reported")
        self.checking.append(selector)
        self.stage = Stage.REPORTING
        return [self.status(), Check(self.number, selector)]

    def _checked(self, event: ContributionChecked) -> list[Effect]:
        if event.round != self.number or event.selector not in self.checking:
            return [Log("INFO", f"round {event.round}: late check of {event.selector}; ignored")]
        self.checking.remove(event.selector)
        if event.error is None:
            self.reported.append(event.selector)
            line = Log(
                "INFO",
                f"round {self.number}: {event.selector} reported "
                f"({len(self.reported)}/{len(self.selectors)})",
            )
        else:
            self.rejected[event.selector] = event.error
            line = Log(
                "ERROR",
                f"round {self.number}: rejected the contribution of "
                f"{event.selector}: {event.error}",
            )
        return [line, *self._maybe_aggregate()]

    def _broadcast_done(self, event: BroadcastDone) -> list[Effect]:
        expected = self.stage in (Stage.CONFIGURATION, Stage.REPORTING) and not self.aggregating
        if event.round != self.number or event.selector not in self.selectors or not expected:
            return [
                Log(
                    "INFO",
                    f"round {event.round}: late answer from {event.selector} to GoalCountReached",
                )
            ]
        if event.error is None:
            self.configured.append(event.selector)
            return [Log("INFO", f"round {self.number}: told {event.selector} to configure"),
                    self.status()]  # fmt: skip
        self.unreachable.append(event.selector)
        line = Log(
            "ERROR",
            f"round {self.number}: could not tell {event.selector} to configure "
            f"({event.error}); dropped it and its "
            f"{self.selectors[event.selector]} client(s)",
        )
        self._drop(event.selector)
        if not self.selectors:
            return [line, *self._fail("no selector of the round could be told to configure")]
        return [line, *self._maybe_aggregate()]

    def _drop(self, selector: str) -> None:
        self.accepted -= self.selectors.pop(selector)
        for group in (self.reported, self.checking, self.configured):
            if selector in group:
                group.remove(selector)
        self.rejected.pop(selector, None)

    def _reported_clients(self) -> int:
        return sum(self.selectors[s] for s in self.reported)

    def _enough_reported(self) -> bool:
        needed = self.rules.min_reporting_fraction * self.accepted
        return bool(self.reported) and self._reported_clients() >= needed - 1e-9

    def _maybe_aggregate(self) -> list[Effect]:
        """Aggregate (or give up) once every selector is reported or rejected."""
        accounted = len(self.reported) + len(self.rejected)
        if self.checking or accounted < len(self.selectors):
            return [self.status()]
        if not self._enough_reported():
            return self._fail(self._shortfall("every selector answered"))
        return self._aggregate()

    def _shortfall(self, when: str) -> str:
        return (f"{when} but only {self._reported_clients()} of {self.accepted} client(s) "
                f"reported usable updates; at least {self.rules.min_reporting_fraction:.0%} "
                "are needed")  # fmt: skip

    def _aggregate(self) -> list[Effect]:
        self.aggregating = True
        return [self.status(), Aggregate(self.number, tuple(self.reported))]

    def _window_closed(self, event: WindowClosed) -> list[Effect]:
        if event.round != self.number or self.aggregating:
            return []
        if event.stage is Stage.SELECTION and self.stage is Stage.SELECTION:
            seconds = self.rules.selection_timeout
            if self.accepted >= self.rules.min_clients:
                return self._configure(
                    f"selection window of {seconds:g} s closed with {self.accepted}/{self.goal} "
                    "client(s)"
                )
            return self._fail(
                f"selection window of {seconds:g} s closed with {self.accepted}/{self.goal} "
                f"client(s); at least {self.rules.min_clients} are needed"
            )
        if event.stage is Stage.REPORTING and self.stage in (Stage.CONFIGURATION, Stage.REPORTING):
            late = [s for s in self.selectors if s not in self.reported and s not in self.rejected]
            when = f"reporting window of {self.rules.reporting_timeout:g} s closed"
            if not self._enough_reported():
                return self._fail(self._shortfall(when))
            effects: list[Effect] = [
                Log("WARNING", f"round {self.number}: {when}; aggregating without "
                               f"{', '.join(late)}")
            ]  # fmt: skip
            self.checking.clear()
            return effects + self._aggregate()
        return []

    def _fail(self, reason: str) -> list[Effect]:
        self.stage = Stage.FAILED
        return [
            Log("ERROR", f"round {self.number}: abandoned, global checkpoint kept as it was: "
                         f"{reason}"),
            self.status(error=reason),
            *self._open_next_round(),
        ]  # fmt: skip

    def _aggregation_done(self, event: AggregationDone) -> list[Effect]:
        if not self.aggregating or event.round != self.number:
            return [
                Log(
                    "WARNING",
                    f"ignored aggregation result of round {event.round}: "
                    f"round {self.number} is not aggregating",
                )
            ]
        self.aggregating = False
        if event.error is not None:
            return self._fail(event.error)
        self.stage = Stage.COMPLETED
        return [
            Log("INFO", f"round {self.number}: completed, aggregated in {event.seconds:.3f} s"),
            self.status(seconds=event.seconds),
            *self._open_next_round(),
        ]

    def _open_next_round(self) -> list[Effect]:
        self.number += 1
        self.stage = Stage.SELECTION
        self.accepted = 0
        self.selectors = {}
        self.reported = []
        self.checking = []
        self.rejected = {}
        self.ignored = []
        self.configured = []

        self.unreachable = []
        held, self.held = self.held, []
        effects = self.start()
        for check_in in held:
            effects.extend(self._check_in(check_in))
        return effects
