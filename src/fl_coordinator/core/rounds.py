"""The round state machine: pure, synchronous, no I/O.

In the style of h11's ``Connection``: :class:`Round` takes one event at a time
(:mod:`.events`) and returns the effects the I/O layer must carry out. It
never reads a clock, a file or a socket, so every sequence of events can be
replayed in a unit test or thrown at it by Hypothesis. Time enters only as
events: the machine asks for a window with :class:`~.events.Arm` and the I/O
layer answers :class:`~.events.WindowClosed` when it ends.

Every change of stage goes through :meth:`Round._move`, which looks the move
up in :data:`.stages.TRANSITIONS` (the table, and the README's stage table
drawn from it, say which moves exist and why). Check-ins that arrive while a
round is aggregating are held and answered, first come first served, when
the next round's selection opens; as many as bring the next round's goal of
clients: the next one would be refused then (the goal reached), so it is
refused at once, and a flood of check-ins during a long aggregation holds no
more calls (and their memory) than a round can take.

A run may end (``FINISHED``): after round ``Rules.rounds``, or when the
metrics of an evaluated round meet ``Rules.stop_when``. Evaluation results
enter as :class:`~.events.Evaluated` events, whenever they come: the machine
asks for an evaluation with :class:`~.events.Evaluate` as a round completes
and opens the next round at once. Under differential privacy the run also
ends before a round that would spend more than ``Rules.max_epsilon``: what
the released rounds spent enters with each :class:`~.events.AggregationDone`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .events import (
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
from .privacy import Spent
from .stages import Cause, Stage, next_stage
from .stopping import RoundMetrics, StopWhen

__all__ = ["Round", "Rules"]

#: Ignored or refused calls kept in the status of a round (the most recent ones).
_IGNORED_KEPT = 20


@dataclass(frozen=True)
class Rules:
    """The goal and the time windows of every round (seconds; 0 = no limit), and the run's end.

    ``min_selectors``: selectors whose reports must be usable for a round to be
    averaged (a median needs 3). ``rounds``: the last round (0: none);
    ``stop_when``: the run ends once an evaluated round's metrics meet it;
    ``evaluate``: completed rounds are evaluated. ``dp_clip_norm`` (> 0: under
    differential privacy) bounds what a selector may report: a weight of at
    most the clients it was accepted for, each update of L2 norm at most that;
    ``max_epsilon``: the privacy budget (None: none).
    """

    goal: int
    selection_timeout: float = 0.0
    min_checkin_fraction: float = 1.0
    reporting_timeout: float = 0.0
    min_reporting_fraction: float = 1.0
    allowed: frozenset[str] = frozenset()  # selector ids that may take part; empty = any
    max_selectors: int = 0  # distinct selectors holding clients in one round; 0 = no limit
    min_selectors: int = 1
    rounds: int = 0
    stop_when: StopWhen | None = None
    evaluate: bool = False
    dp_clip_norm: float = 0.0
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.goal < 1:
            raise ValueError(f"goal must be >= 1, got {self.goal}")

    @property
    def min_clients(self) -> int:
        """Clients a selection window must have gathered for the round to go on."""
        return max(1, math.ceil(self.min_checkin_fraction * self.goal))

    def min_reported(self, accepted: int) -> int:
        """Clients that usable reports must hold for a round of ``accepted`` clients to be
        averaged: ``MIN_REPORTING_FRACTION`` of them, and never none."""
        return max(1, math.ceil(self.min_reporting_fraction * accepted - 1e-9))


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
    validating: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    configured: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)
    #: Check-ins held while aggregating, in arrival order, by ``id(reply_to)``: a withdrawal
    #: forgets one at once (a list was rebuilt for each: 10,000 withdrawn took a second of
    #: the event loop).
    held: dict[int, CheckIn] = field(default_factory=dict)
    held_clients: int = 0  # the clients they ask for
    metrics: RoundMetrics | None = None  # the last evaluated round's
    finished: str | None = None  # why the run ended (FINISHED)
    stopping: str | None = None  # STOP_WHEN was met: finish when the round under way ends
    privacy: Spent | None = None  # under differential privacy: what the released rounds spent
    unaccounted: str | None = None  # why the accountant failed: the budget is unknown

    @property
    def goal(self) -> int:
        return self.rules.goal

    @property
    def aggregating(self) -> bool:
        return self.stage is Stage.AGGREGATING

    def status(self, *, error: str | None = None, seconds: float | None = None) -> Status:
        aggregating = self.stage is Stage.AGGREGATING  # Stage.shown, written out: hot path
        return Status(
            round=self.number,
            stage=Stage.REPORTING if aggregating else self.stage,
            accepted=self.accepted,
            goal=self.goal,
            selectors=tuple(self.selectors),
            reported=tuple(self.reported),
            configured=tuple(self.configured),
            unreachable=tuple(self.unreachable),
            rejected=tuple(self.rejected.items()),
            ignored=tuple(self.ignored),
            aggregating=aggregating,
            held=len(self.held),
            error=error,
            aggregation_seconds=seconds,
            metrics=self.metrics,
            finished=self.finished,
            privacy=self.privacy,
        )

    def start(self) -> list[Effect]:
        """The effects of opening the current round (call once, before any event).

        A run that has already ended (restarted after its last round, or with
        metrics that meet ``stop_when``) stays FINISHED, showing the last round
        it opened.
        """
        ended = self._ended_before()
        if ended is not None:
            self.number -= 1
            return self._finish(Cause.STILL_FINISHED, ended)
        return self._open()

    def _open(self) -> list[Effect]:
        return [Log("INFO", f"round {self.number}: selection open (goal {self.goal})"),
                self.status(), *self._arm(Stage.SELECTION)]  # fmt: skip

    def _ended_before(self) -> str | None:
        """Why the run ended before round ``number`` could open (None: it goes on)."""
        last = self.number - 1
        if self.rules.rounds and last >= self.rules.rounds:
            return self._last_round_reason(last)
        if (spent := self._budget_reason()) is not None:
            return spent
        if self.metrics is not None:
            return self._stop_reason(self.metrics)
        return None

    def _budget_reason(self) -> str | None:
        """Why the privacy budget allows no further round (None: it allows one). A budget
        whose spending cannot be computed allows none: it fails closed."""
        if self.unaccounted is not None and self.rules.max_epsilon is not None:
            return (
                f"the privacy spent cannot be computed ({self.unaccounted}), so no further "
                f"round may be released under DP_MAX_EPSILON={self.rules.max_epsilon:g}; "
                "fix the cause and restart"
            )
        if self.privacy is None:
            return None
        reason = self.privacy.exceeded_by_next(self.rules.max_epsilon)
        return None if reason is None else f"{reason}; to go on, raise DP_MAX_EPSILON and restart"

    def _last_round_reason(self, last: int) -> str:
        return (f"round {last} was the last (ROUNDS={self.rules.rounds}); to go on, raise "
                "ROUNDS and restart")  # fmt: skip

    def _stop_reason(self, metrics: RoundMetrics) -> str | None:
        """Why ``metrics`` end the run (None: they do not)."""
        stop_when = self.rules.stop_when
        if stop_when is None or not stop_when.met(metrics):
            return None
        value = dict(metrics.values)[stop_when.metric]
        return (f"round {metrics.round}'s {stop_when.metric}={value:.6g} meets STOP_WHEN "
                f"{stop_when}; to go on, change STOP_WHEN and restart")  # fmt: skip

    def handle(self, event: Event) -> list[Effect]:
        """Apply one event; return the effects to carry out, in order."""
        match event:
            case CheckIn():
                return self._check_in(event)
            case SelectorReported():
                return self._reported(event)
            case ContributionValidated():
                return self._validated(event)
            case Unchecked():
                return self._unchecked(event)
            case BroadcastDone():
                return self._broadcast_done(event)
            case WindowClosed():
                return self._window_closed(event)
            case AggregationDone():
                return self._aggregation_done(event)
            case Refused():
                return self._note(event.selector, event.reason, "refused a call from")
            case Release():
                return self._release(event)
            case StillWaiting():
                return self._still_waiting(event)
            case Evaluated():
                return self._evaluated(event)
            case Withdrawn():
                return self._withdrawn(event)
        raise TypeError(f"not a round event: {event!r}")

    def _move(self, cause: Cause) -> None:
        """Change stage by the table (ValueError for a move it does not have: a bug)."""
        self.stage = next_stage(self.stage, cause)

    # -- transitions ----------------------------------------------------------

    def _check_in(self, event: CheckIn) -> list[Effect]:
        if self.rules.allowed and event.selector not in self.rules.allowed:
            return self._refuse(event, "not in ALLOWED_SELECTORS")
        if self.aggregating:
            if self.held_clients >= self.goal:
                return self._refuse(
                    event,
                    f"the check-ins held for round {self.number + 1} already bring its goal of "
                    f"{self.goal} client(s); check in again once its selection opens",
                )
            self.held[id(event.reply_to)] = event
            self.held_clients += event.clients
            return [self.status()]
        if self.stage is not Stage.SELECTION:
            return [Answer(event.reply_to, accepted=0, round=self.number)]
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
        effects: list[Effect] = [Answer(event.reply_to, accepted=taken, round=self.number)]
        if self.accepted < self.goal:
            effects.append(self.status())
            return effects
        return effects + self._configure(Cause.GOAL_REACHED, f"goal of {self.goal} reached")

    def _withdrawn(self, event: Withdrawn) -> list[Effect]:
        """Forget a held check-in whose caller is gone. One already answered stays counted,
        even if the answer could not be delivered (logged as "gave up waiting")."""
        withdrawn = self.held.pop(id(event.reply_to), None)
        if withdrawn is None:
            return []
        self.held_clients -= withdrawn.clients
        return [self.status()]

    def _refuse(self, event: CheckIn, why: str) -> list[Effect]:
        return [
            Answer(event.reply_to, accepted=0, round=self.number),
            *self._note(event.selector, f"check-in refused: {why}", "refused a call from"),
        ]

    def _configure(self, cause: Cause, why: str) -> list[Effect]:
        self._move(cause)
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

    def _note(self, selector: str, why: str, what: str, kind: str = "") -> list[Effect]:
        """Keep a call that changed nothing in the status (bounded) and log it.

        The line is throttled by ``kind``: our words only, never a value from
        the call (a peer varying it would make every call a new kind, written
        whole). By default the part of ``why`` before its first colon.
        """
        self.ignored = [*self.ignored, (selector[:300], why)][-_IGNORED_KEPT:]
        line = f"round {self.number}: {what} {selector!r}: {why}"
        kind = f"{what.removesuffix(' from')}: {kind or why.partition(':')[0]}"
        return [Log("WARNING", line, kind=kind, selector=selector), self.status()]

    def _reported(self, event: SelectorReported) -> list[Effect]:
        unexpected = self._unexpected_report(event)
        if unexpected is None:
            effects = self._take_report(event.selector)
        else:
            kind, why = unexpected
            effects = self._note(event.selector, why, "ignored report from", kind=kind)
        if event.reply_to is not None:
            effects.insert(0, AnswerReport(event.reply_to, taken=unexpected is None))
        return effects

    def _unexpected_report(self, event: SelectorReported) -> tuple[str, str] | None:
        """(kind, why) a report changes nothing; None if its selector's files are to be checked.

        The kind is ours alone: the round number is the peer's, and would make
        every report of another round a new kind of line (written, not counted).
        """
        selector = event.selector
        if self.rules.allowed and selector not in self.rules.allowed:
            return "not allowed", "not in ALLOWED_SELECTORS"
        if event.round is not None and event.round != self.number:
            return "another round", f"it is for round {event.round}, not this one"
        if self.aggregating:
            return "no report expected", "round is aggregating, no report expected"
        if self.stage not in (Stage.CONFIGURATION, Stage.REPORTING):
            return "no report expected", f"round is in {self.stage.name}, no report expected"
        if selector not in self.selectors:
            return "not of this round", "not a selector of this round"
        if selector in self.reported or selector in self.validating or selector in self.rejected:
            return "already reported", "it already reported"
        return None

    def _take_report(self, selector: str) -> list[Effect]:
        self.validating.append(selector)
        if self.stage is Stage.CONFIGURATION:
            self._move(Cause.FIRST_REPORT)
        return [self.status(), Validate(self.number, selector)]

    def _release(self, event: Release) -> list[Effect]:
        """Un-count clients a selector let go, while the round is still selecting them."""
        held = self.selectors.get(event.selector, 0)
        if event.round != self.number or self.stage is not Stage.SELECTION or not held:
            where = "not this round" if event.round != self.number else self.stage.name
            return [
                AnswerRelease(event.reply_to, 0),
                Log("INFO", f"round {self.number}: {event.selector!r} released {event.clients} "
                            f"client(s) of round {event.round}; nothing to release ({where}, "
                            f"{held} held)", kind="release of nothing", selector=event.selector),
            ]  # fmt: skip
        released = min(event.clients, held)
        self.accepted -= released
        if released == held:
            del self.selectors[event.selector]
        else:
            self.selectors[event.selector] = held - released
        return [
            AnswerRelease(event.reply_to, released),
            Log("INFO", f"round {self.number}: {event.selector!r} released {released} client(s); "
                        f"{self.accepted}/{self.goal} accepted", kind="released clients",
                selector=event.selector),
            self.status(),
        ]  # fmt: skip

    def _still_waiting(self, event: StillWaiting) -> list[Effect]:
        """A calm progress line for a stage that lasts (SELECTION can wait for ever)."""
        if event.round != self.number:
            return []
        waited = f"for {event.seconds:.0f} s"
        if self.stage is Stage.SELECTION:
            window = self.rules.selection_timeout
            limit = f"{window:g} s windows" if window else "0: no time limit"
            line = (f"waiting for clients: {self.accepted}/{self.goal} accepted {waited} "
                    f"(SELECTION_TIMEOUT={limit})")  # fmt: skip
        elif self.stage is Stage.FINISHED:
            line = f"the run is finished ({self.finished})"
        elif self.stage in (Stage.CONFIGURATION, Stage.REPORTING):
            window = self.rules.reporting_timeout
            limit = f"{window:g} s" if window else "0: no time limit"
            line = (f"waiting for reports: {len(self.reported)} of {len(self.selectors)} "
                    f"selector(s) reported, {len(self.validating)} being validated, "
                    f"{waited} (REPORTING_TIMEOUT={limit})")  # fmt: skip
        else:
            line = f"{self.stage.name.lower()} {waited}"
        return [Log("INFO", f"round {self.number}: {line}")]

    def _late_validation(self, event: ContributionValidated | Unchecked) -> list[Effect] | None:
        """The effects of a validation the round no longer waits for (None: it waits)."""
        if event.round != self.number or event.selector not in self.validating:
            return [
                Log("INFO", f"round {event.round}: late validation of {event.selector}; ignored")
            ]
        return None

    def _validated(self, event: ContributionValidated) -> list[Effect]:
        if (late := self._late_validation(event)) is not None:
            return late
        self.validating.remove(event.selector)
        error = event.error or self._beyond_privacy_bounds(event)
        if error is None:
            self.reported.append(event.selector)
            line = Log(
                "INFO",
                f"round {self.number}: {event.selector} reported "
                f"({len(self.reported)}/{len(self.selectors)})",
            )
        else:
            self.rejected[event.selector] = error
            line = Log(
                "ERROR",
                f"round {self.number}: rejected the contribution of {event.selector}: {error}",
            )
        return [line, *self._maybe_aggregate()]

    def _unchecked(self, event: Unchecked) -> list[Effect]:
        """A report that could not be checked, for want of the coordinator's own resources:
        the round fails as the coordinator's fault (as when an aggregation does), and the
        selector is neither rejected nor averaged without a check."""
        if (late := self._late_validation(event)) is not None:
            return late
        self.validating.remove(event.selector)
        return self._fail(Cause.OUT_OF_RESOURCES, event.reason)

    def _beyond_privacy_bounds(self, event: ContributionValidated) -> str | None:
        """Under differential privacy: why a selector's valid files exceed what its clients
        may contribute (None: they do not). Each client counts once (weight 1) with an update
        of norm <= C, so a selector holding ``n`` clients reports ``N_s <= n`` and
        ``||A_s|| <= N_s C`` (the triangle inequality; a relative 1e-5 for float rounding)."""
        clip = self.rules.dp_clip_norm
        if not clip:
            return None
        accepted = self.selectors[event.selector]
        weight, norm = event.weight, event.norm
        if weight is not None and weight > accepted:
            return (
                f"weight {weight} exceeds the {accepted} client(s) it was accepted for; under "
                "differential privacy each client counts once (weight 1)"
            )
        if norm is not None and weight is not None and not norm <= weight * clip * (1 + 1e-5):
            return (
                f"its update's L2 norm {norm:.6g} exceeds weight x DP_CLIP_NORM = {weight} x "
                f"{clip:g}: its clients' updates were not clipped"
            )
        return None

    def _broadcast_done(self, event: BroadcastDone) -> list[Effect]:
        expected = self.stage in (Stage.CONFIGURATION, Stage.REPORTING)
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
            return [
                line,
                *self._fail(
                    Cause.NONE_CONFIGURABLE, "no selector of the round could be told to configure"
                ),
            ]
        return [line, *self._maybe_aggregate()]

    def _drop(self, selector: str) -> None:
        self.accepted -= self.selectors.pop(selector)
        for group in (self.reported, self.validating, self.configured):
            if selector in group:
                group.remove(selector)
        self.rejected.pop(selector, None)

    def _reported_clients(self) -> int:
        return sum(self.selectors[s] for s in self.reported)

    def _enough_reported(self) -> bool:
        return (
            self._reported_clients() >= self.rules.min_reported(self.accepted)
            and len(self.reported) >= self.rules.min_selectors
        )

    def _maybe_aggregate(self) -> list[Effect]:
        """Aggregate (or give up) once every selector is reported or rejected."""
        accounted = len(self.reported) + len(self.rejected)
        if self.validating or accounted < len(self.selectors):
            return [self.status()]
        if not self._enough_reported():
            return self._fail(Cause.TOO_FEW_REPORTS, self._shortfall("every selector answered"))
        return self._aggregate(Cause.ALL_ACCOUNTED)

    def _shortfall(self, when: str) -> str:
        if self._reported_clients() >= self.rules.min_reported(self.accepted):
            return (f"{when} but only {len(self.reported)} selector(s) reported usable updates; "
                    f"ROBUST_AGGREGATION needs {self.rules.min_selectors}")  # fmt: skip
        return (f"{when} but only {self._reported_clients()} of {self.accepted} client(s) "
                f"reported usable updates; {self.rules.min_reported(self.accepted)} are needed "
                f"(MIN_REPORTING_FRACTION={self.rules.min_reporting_fraction:g})")  # fmt: skip

    def _aggregate(self, cause: Cause) -> list[Effect]:
        self._move(cause)
        return [self.status(), Aggregate(self.number, tuple(self.reported))]

    def _window_closed(self, event: WindowClosed) -> list[Effect]:
        if event.round != self.number or self.aggregating:
            return []
        if event.stage is Stage.SELECTION and self.stage is Stage.SELECTION:
            seconds = self.rules.selection_timeout
            if not self.accepted:
                self._move(Cause.WINDOW_EMPTY)
                return [
                    Log("DEBUG", f"round {self.number}: selection window of {seconds:g} s "
                                 "closed with no client; it opens again"),
                    *self._arm(Stage.SELECTION),
                ]  # fmt: skip
            closed = (
                f"selection window of {seconds:g} s closed with {self.accepted}/{self.goal} "
                "client(s)"
            )
            if self.accepted >= self.rules.min_clients:
                return self._configure(Cause.WINDOW_ENOUGH_CLIENTS, closed)
            return self._fail(
                Cause.WINDOW_TOO_FEW_CLIENTS,
                f"{closed}; at least {self.rules.min_clients} are needed",
            )
        if event.stage is Stage.REPORTING and self.stage in (Stage.CONFIGURATION, Stage.REPORTING):
            late = [s for s in self.selectors if s not in self.reported and s not in self.rejected]
            when = f"reporting window of {self.rules.reporting_timeout:g} s closed"
            if not self._enough_reported():
                return self._fail(Cause.TOO_FEW_REPORTS, self._shortfall(when))
            effects: list[Effect] = [
                Log("WARNING", f"round {self.number}: {when}; aggregating without "
                               f"{', '.join(late)}")
            ]  # fmt: skip
            self.validating.clear()
            return effects + self._aggregate(Cause.WINDOW_ENOUGH_REPORTS)
        return []

    def _fail(self, cause: Cause, reason: str) -> list[Effect]:
        self._move(cause)
        return [
            Log("ERROR", f"round {self.number}: abandoned, global checkpoint kept as it was: "
                         f"{reason}"),
            self.status(error=reason),
            *self._open_next_round(),
        ]  # fmt: skip

    def _aggregation_done(self, event: AggregationDone) -> list[Effect]:
        if event.privacy is not None:  # spent whatever became of the round
            self.privacy = event.privacy
        if event.unaccounted is not None:
            self.unaccounted = event.unaccounted
        if not self.aggregating or event.round != self.number:
            return [
                Log(
                    "WARNING",
                    f"ignored aggregation result of round {event.round}: "
                    f"round {self.number} is not aggregating",
                )
            ]
        if event.rejected:
            return self._reject_reported(event.rejected)
        if event.error is not None:
            return self._fail(Cause.AGGREGATION_FAILED, event.error)
        self._move(Cause.AGGREGATED)
        return [
            Log(
                "INFO",
                f"round {self.number}: completed, aggregated in {event.seconds:.3f} s"
                + self._spent_words(),
            ),
            self.status(seconds=event.seconds),
            *([Evaluate(self.number)] if self.rules.evaluate else []),
            *self._open_next_round(),
        ]

    def _spent_words(self) -> str:
        if self.privacy is None:
            return ""
        spent = self.privacy
        return f"; privacy spent: epsilon={spent.epsilon:.4g} at delta={spent.delta:g}"

    def _reject_reported(self, rejected: tuple[tuple[str, str], ...]) -> list[Effect]:
        """Reported selectors refused by the aggregation (their files changed since their
        check): average the rest again, if enough are left."""
        effects: list[Effect] = []
        for selector, why in rejected:
            if selector in self.reported:
                self.reported.remove(selector)
                self.rejected[selector] = why
                effects.append(Log("ERROR", f"round {self.number}: rejected the contribution "
                                            f"of {selector} while averaging: {why}"))  # fmt: skip
        if not effects:  # nobody of this round: averaging the same again would not help
            return self._fail(Cause.AGGREGATION_FAILED, "; ".join(why for _, why in rejected))
        if not self._enough_reported():
            return effects + self._fail(
                Cause.TOO_FEW_REPORTS, self._shortfall("files were refused while averaging")
            )
        return effects + self._aggregate(Cause.FILES_CHANGED)

    def _open_next_round(self) -> list[Effect]:
        """After a round ended: the next one, or the end of the run."""
        if self.stopping is not None:
            return self._finish(Cause.STOP_CONDITION, self.stopping)
        if self.rules.rounds and self.number >= self.rules.rounds:
            return self._finish(Cause.LAST_ROUND, self._last_round_reason(self.number))
        if (spent := self._budget_reason()) is not None:
            return self._finish(Cause.PRIVACY_BUDGET, spent)
        self._move(Cause.NEXT_ROUND)
        self.number += 1
        self.accepted = 0
        self.selectors = {}
        self.reported = []
        self.validating = []
        self.rejected = {}
        self.ignored = []
        self.configured = []
        self.unreachable = []
        held = self._take_held()
        effects = self._open()
        for check_in in held:
            effects.extend(self._check_in(check_in))
        return effects

    def _take_held(self) -> list[CheckIn]:
        """The held check-ins, in arrival order; none are held any more."""
        held = list(self.held.values())
        self.held, self.held_clients = {}, 0
        return held

    def _finish(self, cause: Cause, reason: str) -> list[Effect]:
        """End the run: check-ins held for a next round are refused, as every later one is."""
        self._move(cause)
        self.finished = reason
        self.stopping = None
        self.validating = []  # the round has ended: a check still running reports too late
        return [
            Log("INFO", f"the run is finished: {reason}"),
            *(
                Answer(check_in.reply_to, accepted=0, round=self.number)
                for check_in in self._take_held()
            ),
            self.status(),
        ]

    def _evaluated(self, event: Evaluated) -> list[Effect]:
        """Metrics of a completed round arrived (or why none will): show them, and end the
        run if they meet ``stop_when``."""
        if event.error is not None:
            return [Log("WARNING", f"round {event.round}: no metrics ({event.error})")]
        if self.metrics is not None and event.round <= self.metrics.round:
            return [Log("INFO", f"round {event.round}: metrics older than round "
                                f"{self.metrics.round}'s; ignored")]  # fmt: skip
        self.metrics = RoundMetrics(event.round, event.metrics)
        effects: list[Effect] = [
            Log("INFO", f"round {event.round}: evaluated: {self.metrics.describe() or 'nothing'}")
        ]
        reason = self._stop_reason(self.metrics)
        if reason is None or self.stage is Stage.FINISHED:
            return [*effects, self.status()]
        if self.stage is Stage.SELECTION:
            return effects + self._finish(Cause.STOP_CONDITION, reason)
        if self.stopping is None:
            self.stopping = reason
            effects.append(Log("INFO", f"round {self.number}: the run finishes when this round "
                                       f"ends: {reason}"))  # fmt: skip
        return [*effects, self.status()]
