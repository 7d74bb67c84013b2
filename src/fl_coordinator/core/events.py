"""The round machine's vocabulary: the events it takes and the effects it asks for.

Small frozen classes, as h11's ``_events.py``: an event is something that
happened (a check-in arrived, a selector was told, a window closed); an
effect is something the I/O layer must do (answer, tell the selectors,
validate or average files, open a window, publish a status, log a line) and
usually report back as a new event. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from .privacy import Spent
from .stages import Stage
from .stopping import RoundMetrics

__all__ = [
    "Aggregate",
    "AggregationDone",
    "Answer",
    "AnswerRelease",
    "AnswerReport",
    "Arm",
    "Broadcast",
    "BroadcastDone",
    "CheckIn",
    "ContributionValidated",
    "Effect",
    "Evaluate",
    "Evaluated",
    "Event",
    "Log",
    "Refused",
    "Release",
    "SelectorReported",
    "Status",
    "StillWaiting",
    "Unchecked",
    "Validate",
    "WindowClosed",
    "Withdrawn",
]


# -- events (inputs) ----------------------------------------------------------


@dataclass(frozen=True)
class CheckIn:
    """A selector asks to keep ``clients`` clients (1 for ``ClientCountUpdate``, N >= 1 for
    the batched check-in). ``reply_to`` is opaque to the machine."""

    selector: str
    reply_to: Hashable
    clients: int = 1


@dataclass(frozen=True)
class Withdrawn:
    """The caller of the check-in ``reply_to`` stopped waiting before it was answered (its
    connection closed): a held check-in is dropped, never admitted for clients nobody holds."""

    selector: str
    reply_to: Hashable


@dataclass(frozen=True)
class BroadcastDone:
    """The I/O layer finished telling one selector (``error`` after all its retries)."""

    round: int
    selector: str
    error: str | None = None


@dataclass(frozen=True)
class SelectorReported:
    """A selector wrote its aggregate files: ``SelectorAggregationComplete(selector)``
    (``round`` None: the old wire cannot say for which round), or our
    ``ReportAggregate`` (``round`` is the round it was told; answered at ``reply_to``)."""

    selector: str
    round: int | None = None
    reply_to: Hashable | None = None


@dataclass(frozen=True)
class Release:
    """A selector no longer holds ``clients`` of the clients round ``round`` accepted."""

    selector: str
    reply_to: Hashable
    clients: int
    round: int


@dataclass(frozen=True)
class StillWaiting:
    """The round has been in its current stage for ``seconds`` (a calm, growing interval)."""

    round: int
    seconds: float


@dataclass(frozen=True)
class ContributionValidated:
    """The I/O layer validated a reporting selector's files (``error`` if unusable).

    ``weight`` is the ``N_s`` the files claim and ``norm`` the L2 norm of their
    ``A_s`` over all weight arrays (None: not measured); under differential
    privacy the round compares them with the clients the selector was accepted for.
    """

    round: int
    selector: str
    error: str | None = None
    weight: int | None = None
    norm: float | None = None


@dataclass(frozen=True)
class Unchecked:
    """A reporting selector's files could not be checked: the coordinator ran out of its
    own resources (``reason`` says which, and what to raise). Not the selector's fault."""

    round: int
    selector: str
    reason: str


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
    """The aggregation of ``round`` ended: ``error`` is None when the checkpoint was replaced.

    ``rejected`` (selector, reason): the aggregation refused these selectors'
    files (changed since their check) and wrote nothing; the others may be
    averaged again without them.
    """

    round: int
    error: str | None = None
    seconds: float = 0.0
    rejected: tuple[tuple[str, str], ...] = ()
    #: Under differential privacy: what the released rounds have spent, this one included.
    privacy: Spent | None = None
    #: Under differential privacy: why the accountant could not say what was spent (the
    #: budget is then unknown, and a run with one ends rather than release more).
    unaccounted: str | None = None


@dataclass(frozen=True)
class Evaluated:
    """The evaluation of round ``round``'s checkpoint ended: its ``metrics`` (name, value)
    pairs, or why there are none (``error``: it failed, hung, or was skipped)."""

    round: int
    metrics: tuple[tuple[str, float], ...] = ()
    error: str | None = None


Event = (
    CheckIn | BroadcastDone | SelectorReported | ContributionValidated | WindowClosed
    | AggregationDone | Refused | Release | StillWaiting | Evaluated | Withdrawn | Unchecked
)  # fmt: skip


# -- effects (outputs) --------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """Answer a check-in: how many of the clients it asked for were accepted (0 = refused),
    and for which round."""

    reply_to: Hashable
    accepted: int
    round: int


@dataclass(frozen=True)
class AnswerRelease:
    """Answer a release: how many clients the round stopped counting."""

    reply_to: Hashable
    released: int


@dataclass(frozen=True)
class AnswerReport:
    """Answer a report that named its round: whether it was taken (its files get validated)."""

    reply_to: Hashable
    taken: bool


@dataclass(frozen=True)
class Broadcast:
    """Send ``GoalCountReached`` to each of ``selectors`` (concurrently, with retries)."""

    round: int
    selectors: tuple[str, ...]


@dataclass(frozen=True)
class Validate:
    """Validate ``selector``'s aggregate files; answer with ContributionValidated."""

    round: int
    selector: str


@dataclass(frozen=True)
class Aggregate:
    """Average the aggregates of ``selectors`` into the global checkpoint."""

    round: int
    selectors: tuple[str, ...]


@dataclass(frozen=True)
class Evaluate:
    """Evaluate the checkpoint round ``round`` produced (off the round's path: the next
    round goes on meanwhile); answer with Evaluated."""

    round: int


@dataclass(frozen=True)
class Arm:
    """Start a window of ``seconds`` for ``stage`` of ``round``; answer with WindowClosed."""

    round: int
    stage: Stage
    seconds: float


@dataclass(frozen=True)
class Status:
    """A snapshot of the round, published to the status stream.

    ``stage`` is the stage as the stream names it (:attr:`.Stage.shown`: never
    AGGREGATING); ``aggregating`` says whether the round is averaging;
    ``metrics`` are the last evaluated round's; ``finished`` says why the run
    ended (with FINISHED).
    """

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
    metrics: RoundMetrics | None = None
    finished: str | None = None
    privacy: Spent | None = None  # under differential privacy: spent so far


@dataclass(frozen=True)
class Log:
    """A line for the operator; ``level`` is a :mod:`logging` level name.

    ``kind`` names lines a peer can repeat at will (a refused or ignored
    call), about ``selector``: the coordinator writes them at most once per
    interval and selector, with a count (see :mod:`fl_coordinator.log_throttle`).
    """

    level: str
    message: str
    kind: str = ""
    selector: str = ""


Effect = (
    Answer | AnswerRelease | AnswerReport | Broadcast | Validate | Aggregate | Evaluate | Arm
    | Status | Log
)  # fmt: skip
