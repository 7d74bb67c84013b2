"""The round state machine: pure, synchronous, no I/O.

In the style of h11's ``Connection``: :class:`Round` takes one event at a time
and returns the effects the I/O layer must carry out (answer an RPC, tell the
selectors, start an aggregation, publish a status, write a log line). It
never reads a clock, a file or a socket, so every sequence of events can be
replayed in a unit test or thrown at it by Hypothesis.

Stages within a round only move forward::

    SELECTION --goal reached--> CONFIGURATION --first report--> REPORTING
        --all reported, aggregation finished--> COMPLETED | FAILED

and after COMPLETED or FAILED the next round opens in SELECTION with the next
number. Check-ins that arrive while a round is aggregating are held and
answered, first come first served, when the next round's selection opens.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field

# -- stages -------------------------------------------------------------------


class Stage(enum.Enum):
    """Stage names and values of fl_status.proto's ``Stages``, plus FAILED (ours)."""

    SELECTION = 0
    CONFIGURATION = 1
    REPORTING = 2
    COMPLETED = 3
    FAILED = 4


# -- events (inputs) ----------------------------------------------------------


@dataclass(frozen=True)
class CheckIn:
    """A selector asks to keep one client. ``reply_to`` is opaque to the machine."""

    selector: str
    reply_to: Hashable


@dataclass(frozen=True)
class BroadcastDone:
    """The I/O layer finished telling one selector (``error`` is None on success)."""

    round: int
    selector: str
    error: str | None = None


@dataclass(frozen=True)
class SelectorReported:
    """``SelectorAggregationComplete(selector)`` arrived."""

    selector: str


@dataclass(frozen=True)
class AggregationDone:
    """The aggregation of ``round`` ended: ``error`` is None when the checkpoint was replaced."""

    round: int
    error: str | None = None
    seconds: float = 0.0


Event = CheckIn | BroadcastDone | SelectorReported | AggregationDone


# -- effects (outputs) --------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Answer a held ``ClientCountUpdate``."""

    reply_to: Hashable
    accepted: bool


@dataclass(frozen=True)
class Broadcast:
    """Send ``GoalCountReached`` to each of ``selectors`` (concurrently)."""

    round: int
    selectors: tuple[str, ...]


@dataclass(frozen=True)
class Aggregate:
    """Average the aggregates of ``selectors`` into the global checkpoint."""

    round: int
    selectors: tuple[str, ...]


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
    aggregating: bool = False
    held: int = 0
    error: str | None = None
    aggregation_seconds: float | None = None


@dataclass(frozen=True)
class Log:
    """A line for the operator; ``level`` is a :mod:`logging` level name."""

    level: str
    message: str


Effect = Reply | Broadcast | Aggregate | Status | Log


# -- the machine --------------------------------------------------------------


@dataclass
class Round:
    """State of the current round and the transition function :meth:`handle`.

    ``selectors`` maps each selector holding accepted clients to how many it
    holds, in the order they first checked in.
    """

    goal: int
    number: int = 1
    stage: Stage = Stage.SELECTION
    accepted: int = 0
    selectors: dict[str, int] = field(default_factory=dict)
    reported: list[str] = field(default_factory=list)
    configured: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    aggregating: bool = False
    held: list[CheckIn] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.goal < 1:
            raise ValueError(f"goal must be >= 1, got {self.goal}")

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
            aggregating=self.aggregating,
            held=len(self.held),
            error=error,
            aggregation_seconds=seconds,
        )

    def handle(self, event: Event) -> list[Effect]:
        """Apply one event; return the effects to carry out, in order."""
        match event:
            case CheckIn():
                return self._check_in(event)
            case SelectorReported():
                return self._reported(event.selector)
            case AggregationDone():
                return self._aggregation_done(event)
            case BroadcastDone():
                return self._broadcast_done(event)
        raise TypeError(f"not a round event: {event!r}")

    # -- transitions ----------------------------------------------------------

    def _check_in(self, event: CheckIn) -> list[Effect]:
        if self.aggregating:
            self.held.append(event)
            return [self.status()]
        if self.stage is not Stage.SELECTION:
            return [Reply(event.reply_to, accepted=False)]
        self.accepted += 1
        self.selectors[event.selector] = self.selectors.get(event.selector, 0) + 1
        effects: list[Effect] = [Reply(event.reply_to, accepted=True)]
        if self.accepted < self.goal:
            effects.append(self.status())
            return effects
        self.stage = Stage.CONFIGURATION
        effects.append(
            Log(
                "INFO",
                f"round {self.number}: goal of {self.goal} reached; configuring "
                f"{len(self.selectors)} selector(s)",
            )
        )
        effects.append(self.status())
        effects.append(Broadcast(self.number, tuple(self.selectors)))
        return effects

    def _reported(self, selector: str) -> list[Effect]:
        if self.stage not in (Stage.CONFIGURATION, Stage.REPORTING) or self.aggregating:
            what = "is aggregating" if self.aggregating else f"is in {self.stage.name}"
            return [
                Log(
                    "WARNING",
                    f"round {self.number}: ignored report from {selector!r}: "
                    f"round {what}, no report expected",
                )
            ]
        if selector not in self.selectors:
            return [
                Log(
                    "WARNING",
                    f"round {self.number}: ignored report from {selector!r}: "
                    "not a selector of this round",
                )
            ]
        if selector in self.reported:
            return [
                Log(
                    "WARNING",
                    f"round {self.number}: ignored report from {selector!r}: it already reported",
                )
            ]
        self.reported.append(selector)
        self.stage = Stage.REPORTING
        effects: list[Effect] = [
            Log(
                "INFO",
                f"round {self.number}: {selector} reported "
                f"({len(self.reported)}/{len(self.selectors)})",
            ),
        ]
        if len(self.reported) == len(self.selectors):
            self.aggregating = True
            effects.append(self.status())
            effects.append(Aggregate(self.number, tuple(self.reported)))
        else:
            effects.append(self.status())
        return effects

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
        effects: list[Effect]
        if event.error is None:
            self.stage = Stage.COMPLETED
            effects = [
                Log("INFO", f"round {self.number}: completed, aggregated in {event.seconds:.3f} s"),
                self.status(seconds=event.seconds),
            ]
        else:
            self.stage = Stage.FAILED
            effects = [
                Log(
                    "ERROR",
                    f"round {self.number}: failed, global checkpoint kept as it was: {event.error}",
                ),
                self.status(error=event.error),
            ]
        return effects + self._open_next_round()

    def _broadcast_done(self, event: BroadcastDone) -> list[Effect]:
        if event.round != self.number or event.selector not in self.selectors:
            return [
                Log(
                    "INFO",
                    f"round {event.round}: late answer from {event.selector} to GoalCountReached",
                )
            ]
        if event.error is None:
            self.configured.append(event.selector)
            line = Log("INFO", f"round {event.round}: told {event.selector} to configure")
        else:
            self.unreachable.append(event.selector)
            line = Log(
                "ERROR",
                f"round {event.round}: could not tell {event.selector} to configure: {event.error}",
            )
        return [line, self.status()]

    def _open_next_round(self) -> list[Effect]:
        self.number += 1
        self.stage = Stage.SELECTION
        self.accepted = 0
        self.selectors = {}
        self.reported = []
        self.configured = []
        self.unreachable = []
        held, self.held = self.held, []
        effects: list[Effect] = [Log("INFO", f"round {self.number}: selection open"), self.status()]
        for check_in in held:
            effects.extend(self._check_in(check_in))
        return effects
