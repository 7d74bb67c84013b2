"""The stages of a round and every move between them, as data.

Every transition of the round machine lives in :data:`TRANSITIONS`, in this
one file, as h11's ``_state.py`` keeps its own: a move is a (stage, cause)
pair and the stage it leads to. :class:`~.rounds.Round` looks each move up
here (:func:`next_stage`) and never assigns a stage by itself, so a move
that is not in the table is a bug that fails loudly, and the README's stage
table and diagram are generated from the same data (:func:`markdown_table`,
:func:`mermaid_diagram`; ``tests/core/test_stages.py`` keeps them equal), so
they cannot drift from the code.

``AGGREGATING`` is a state of the machine but not a stage of the wire: the
Go system's ``fl_status.proto`` knows four stages, and the status stream
shows an aggregating round as ``REPORTING`` with ``"aggregating": true``
(:attr:`Stage.shown`). ``FINISHED`` is the one stage with no way out: the
run has ended (``ROUNDS``, ``STOP_WHEN``), and only a restart with other
settings goes on.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "SHOWN_STAGES",
    "TRANSITIONS",
    "Cause",
    "Stage",
    "markdown_table",
    "mermaid_diagram",
    "next_stage",
]


class Stage(enum.Enum):
    """The states of a round, in the order a round goes through them.

    Values 0-3 are fl_status.proto's ``Stages`` (the wire's); 4, 5 and 6 are ours.
    """

    SELECTION = 0
    CONFIGURATION = 1
    REPORTING = 2
    AGGREGATING = 5
    COMPLETED = 3
    FAILED = 4
    FINISHED = 6

    @property
    def shown(self) -> Stage:
        """The stage as the status stream and the metrics name it (AGGREGATING is REPORTING)."""
        return Stage.REPORTING if self is Stage.AGGREGATING else self


#: The stages a status message can carry, in order.
SHOWN_STAGES: tuple[Stage, ...] = tuple(s for s in Stage if s.shown is s)


class Cause(enum.Enum):
    """What moves a round from one stage to the next; the value says it to a person."""

    GOAL_REACHED = "`CHECKIN_LIMIT` clients are accepted"
    WINDOW_ENOUGH_CLIENTS = (
        "the selection window (`SELECTION_TIMEOUT`) closes with at least "
        "`MIN_CHECKIN_FRACTION` of the goal"
    )
    WINDOW_EMPTY = (
        "the selection window closes with no client at all: an idle federation, not a "
        "failure; the window opens again in the same round"
    )
    WINDOW_TOO_FEW_CLIENTS = (
        "the selection window closes with some clients, but less than `MIN_CHECKIN_FRACTION` "
        "of the goal"
    )
    FIRST_REPORT = "the first selector reports"
    NONE_CONFIGURABLE = (
        "no selector of the round could be told (`GoalCountReached` failed after "
        "`GOAL_COUNT_RETRIES` retries)"
    )
    ALL_ACCOUNTED = (
        "every selector has reported or been rejected, and the usable reports hold at "
        "least `MIN_REPORTING_FRACTION` of the clients (from at least as many selectors as "
        "`ROBUST_AGGREGATION` needs)"
    )
    WINDOW_ENOUGH_REPORTS = (
        "the reporting window (`REPORTING_TIMEOUT`) closes and the usable reports hold at "
        "least `MIN_REPORTING_FRACTION` of the clients (from enough selectors)"
    )
    TOO_FEW_REPORTS = (
        "every selector has answered, or the reporting window has closed, and the usable "
        "reports hold less than `MIN_REPORTING_FRACTION` of the clients, or come from fewer "
        "selectors than `ROBUST_AGGREGATION` needs"
    )
    FILES_CHANGED = (
        "some selectors' files changed after their check, or their storage did not answer "
        "while they were averaged: they are rejected, and the others averaged again if they "
        "still hold `MIN_REPORTING_FRACTION` of the clients"
    )
    OUT_OF_RESOURCES = (
        "a selector's files cannot be checked because the coordinator is out of its own "
        "descriptors or memory, still after trying again for `CHECK_TIMEOUT`: no selector is "
        "rejected for it"
    )
    AGGREGATED = "the new global checkpoint is in place"
    AGGREGATION_FAILED = "the aggregation fails (a file or the disk): nothing is replaced"
    NEXT_ROUND = "at once: the next round opens"
    LAST_ROUND = "the round that ended was round `ROUNDS` (0: there is no last round)"
    STOP_CONDITION = (
        "the metrics of an evaluated round meet `STOP_WHEN`: at once in `SELECTION`, "
        "otherwise when the round under way has ended"
    )
    PRIVACY_BUDGET = (
        "the next round would spend more privacy than `DP_MAX_EPSILON` (differential privacy)"
    )
    STILL_FINISHED = (
        "at start-up: the run had ended, and `ROUNDS`, `STOP_WHEN` or `DP_MAX_EPSILON` still say so"
    )


_S, _C = Stage, Cause

#: Every legal move: (stage, cause) -> the next stage.
TRANSITIONS: Mapping[tuple[Stage, Cause], Stage] = MappingProxyType(
    {
        (_S.SELECTION, _C.GOAL_REACHED): _S.CONFIGURATION,
        (_S.SELECTION, _C.WINDOW_ENOUGH_CLIENTS): _S.CONFIGURATION,
        (_S.SELECTION, _C.WINDOW_EMPTY): _S.SELECTION,
        (_S.SELECTION, _C.WINDOW_TOO_FEW_CLIENTS): _S.FAILED,
        (_S.CONFIGURATION, _C.FIRST_REPORT): _S.REPORTING,
        (_S.CONFIGURATION, _C.NONE_CONFIGURABLE): _S.FAILED,
        (_S.CONFIGURATION, _C.TOO_FEW_REPORTS): _S.FAILED,
        (_S.REPORTING, _C.ALL_ACCOUNTED): _S.AGGREGATING,
        (_S.REPORTING, _C.WINDOW_ENOUGH_REPORTS): _S.AGGREGATING,
        (_S.REPORTING, _C.TOO_FEW_REPORTS): _S.FAILED,
        (_S.REPORTING, _C.NONE_CONFIGURABLE): _S.FAILED,
        (_S.REPORTING, _C.OUT_OF_RESOURCES): _S.FAILED,
        (_S.AGGREGATING, _C.AGGREGATED): _S.COMPLETED,
        (_S.AGGREGATING, _C.AGGREGATION_FAILED): _S.FAILED,
        (_S.AGGREGATING, _C.FILES_CHANGED): _S.AGGREGATING,
        (_S.AGGREGATING, _C.TOO_FEW_REPORTS): _S.FAILED,
        (_S.SELECTION, _C.STOP_CONDITION): _S.FINISHED,
        (_S.SELECTION, _C.STILL_FINISHED): _S.FINISHED,
        (_S.COMPLETED, _C.NEXT_ROUND): _S.SELECTION,
        (_S.COMPLETED, _C.LAST_ROUND): _S.FINISHED,
        (_S.COMPLETED, _C.STOP_CONDITION): _S.FINISHED,
        (_S.COMPLETED, _C.PRIVACY_BUDGET): _S.FINISHED,
        (_S.FAILED, _C.NEXT_ROUND): _S.SELECTION,
        (_S.FAILED, _C.LAST_ROUND): _S.FINISHED,
        (_S.FAILED, _C.STOP_CONDITION): _S.FINISHED,
        (_S.FAILED, _C.PRIVACY_BUDGET): _S.FINISHED,
    }
)

#: What happens in each stage, for the README's table.
_DESCRIPTIONS: Mapping[Stage, str] = MappingProxyType(
    {
        _S.SELECTION: (
            "each `ClientCountUpdate` is one client (a batched `CheckInClients`, up to N); "
            "first come, first served"
        ),
        _S.CONFIGURATION: (
            "`GoalCountReached` is sent, concurrently, to every selector holding an accepted "
            "client; they send `initFiles/` to their clients"
        ),
        _S.REPORTING: (
            "selectors call `SelectorAggregationComplete` after writing their aggregate files; "
            "each one's files are checked when it reports"
        ),
        _S.AGGREGATING: (
            "the usable aggregates are averaged into a new global checkpoint (shown as "
            '`REPORTING` with `"aggregating": true`); check-ins are held for the next round'
        ),
        _S.COMPLETED: "the new global checkpoint is in place",
        _S.FAILED: "the round is abandoned; the global checkpoint is kept as it was",
        _S.FINISHED: (
            "the run has ended: every check-in is answered `accepted=false`; status, health "
            "and metrics are served until the coordinator is stopped"
        ),
    }
)


def next_stage(stage: Stage, cause: Cause) -> Stage:
    """The stage ``cause`` moves a round in ``stage`` to; ValueError if the move is not legal."""
    try:
        return TRANSITIONS[stage, cause]
    except KeyError:
        raise ValueError(f"no move from {stage.name} on {cause.name}") from None


#: What ends a stage that no move leaves, for the README's table.
_TERMINAL = "a restart with a higher `ROUNDS` (or another `STOP_WHEN`) opens the next round"


def markdown_table() -> str:
    """The README's stage table: one row per move, grouped by stage (one row for a stage
    that no move leaves)."""
    rows = ["| stage | what happens | next stage | when |", "|---|---|---|---|"]
    for stage in Stage:
        moves = [(cause, dest) for (src, cause), dest in TRANSITIONS.items() if src is stage]
        if not moves:
            rows.append(f"| `{stage.name}` | {_DESCRIPTIONS[stage]} | (none) | {_TERMINAL} |")
        for index, (cause, dest) in enumerate(moves):
            name, what = (f"`{stage.name}`", _DESCRIPTIONS[stage]) if index == 0 else ("", "")
            rows.append(f"| {name} | {what} | `{dest.name}` | {cause.value} |")
    return "\n".join(rows) + "\n"


def mermaid_diagram() -> str:
    """The README's state diagram (Mermaid), one arrow per move."""
    lines = ["stateDiagram-v2", f"    [*] --> {Stage.SELECTION.name}"]
    for (src, cause), dest in TRANSITIONS.items():
        lines.append(f"    {src.name} --> {dest.name}: {cause.name.lower().replace('_', ' ')}")
    return "\n".join(lines) + "\n"
