"""The transition table: every move the machine makes is in it, every move in it is made,
and the README's stage table and diagram are generated from it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import REPO

from fl_coordinator.core import rounds
from fl_coordinator.core.events import (
    AggregationDone,
    BroadcastDone,
    CheckIn,
    ContributionValidated,
    Evaluated,
    SelectorReported,
    Unchecked,
    WindowClosed,
)
from fl_coordinator.core.privacy import Spent
from fl_coordinator.core.rounds import Round, Rules
from fl_coordinator.core.stages import (
    SHOWN_STAGES,
    TRANSITIONS,
    Cause,
    Stage,
    markdown_table,
    mermaid_diagram,
    next_stage,
)
from fl_coordinator.core.stopping import RoundMetrics, StopWhen


def report(machine: Round, selector: str, error: str | None = None) -> None:
    machine.handle(SelectorReported(selector))
    machine.handle(ContributionValidated(machine.number, selector, error))


def goal_then_window(machine: Round) -> None:
    machine.handle(CheckIn("a:1", 1))
    machine.handle(WindowClosed(1, Stage.SELECTION))


def aggregated(ok: bool) -> Callable[[Round], None]:
    def scenario(machine: Round) -> None:
        machine.handle(CheckIn("a:1", 1))
        report(machine, "a:1")
        machine.handle(AggregationDone(1, error=None if ok else "disk full"))

    return scenario


def dropped_after_report(machine: Round) -> None:
    machine.handle(CheckIn("a:1", 1))
    machine.handle(SelectorReported("a:1"))  # REPORTING, its files being validated
    machine.handle(BroadcastDone(1, "a:1", error="no answer within 10 s"))


def rejected(machine: Round) -> None:
    machine.handle(CheckIn("a:1", 1))
    report(machine, "a:1", error="bad file")


def unchecked(machine: Round) -> None:
    machine.handle(CheckIn("a:1", 1))
    machine.handle(SelectorReported("a:1"))
    machine.handle(Unchecked(1, "a:1", "out of descriptors"))


def window_in_configuration(machine: Round) -> None:
    machine.handle(CheckIn("a:1", 1))
    machine.handle(WindowClosed(1, Stage.REPORTING))


def window_with_enough_reports(machine: Round) -> None:
    machine.handle(CheckIn("a:1", 1))
    machine.handle(CheckIn("b:1", 2))
    report(machine, "a:1")
    machine.handle(WindowClosed(1, Stage.REPORTING))


def files_changed(survivors: int) -> Callable[[Round], None]:
    """Two selectors report; the aggregation refuses one's files (changed since checked)."""

    def scenario(machine: Round) -> None:
        machine.handle(CheckIn("a:1", 1))
        machine.handle(CheckIn("b:1", 2))
        report(machine, "a:1")
        report(machine, "b:1")
        machine.handle(AggregationDone(1, rejected=(("b:1", "changed after it was checked"),)))
        if survivors:
            machine.handle(AggregationDone(1))

    return scenario


def empty_window(machine: Round) -> None:
    machine.handle(WindowClosed(1, Stage.SELECTION))


def unreachable(machine: Round) -> None:
    machine.handle(CheckIn("a:1", 1))
    machine.handle(BroadcastDone(1, "a:1", error="refused"))


GOOD = (("accuracy", 0.97),)


def met_in_selection(machine: Round) -> None:
    """Round 1 completes; its metrics, met while round 2 selects, end the run at once."""
    aggregated(ok=True)(machine)
    machine.handle(Evaluated(1, GOOD))


def met_while_under_way(ok: bool) -> Callable[[Round], None]:
    """Round 1's metrics arrive once round 2 is configuring: the run ends with round 2."""

    def scenario(machine: Round) -> None:
        aggregated(ok=True)(machine)
        machine.handle(CheckIn("a:1", 2))
        machine.handle(Evaluated(1, GOOD))
        report(machine, "a:1")
        machine.handle(AggregationDone(2, error=None if ok else "disk full"))

    return scenario


def spent(ok: bool) -> Callable[[Round], None]:
    """Round 1 ends (completed or not) with a budget that allows no second round."""

    def scenario(machine: Round) -> None:
        machine.handle(CheckIn("a:1", 1))
        report(machine, "a:1")
        over = Spent(epsilon=0.9, delta=1e-5, rounds=1, next_epsilon=1.2)
        machine.handle(AggregationDone(1, error=None if ok else "disk full", privacy=over))

    return scenario


def nothing(machine: Round) -> None:
    """The moves of start() alone."""


WINDOWS = {"selection_timeout": 5, "reporting_timeout": 5}
STOP = {"evaluate": True, "stop_when": StopWhen.parse("accuracy>=0.95")}
BUDGET = {"dp_clip_norm": 1.0, "max_epsilon": 1.0}
#: (rules, scenario[, how the round machine is made: a restart's number and metrics])
SCENARIOS: list[
    tuple[Rules, Callable[[Round], None]] | tuple[Rules, Callable[[Round], None], dict]
] = [
    (Rules(goal=2, min_checkin_fraction=0.5, **WINDOWS), goal_then_window),
    (Rules(goal=2, min_checkin_fraction=1.0, **WINDOWS), goal_then_window),
    (Rules(goal=1), aggregated(ok=True)),
    (Rules(goal=1), aggregated(ok=False)),
    (Rules(goal=1), dropped_after_report),
    (Rules(goal=1), rejected),
    (Rules(goal=1), unchecked),
    (Rules(goal=1, **WINDOWS), window_in_configuration),
    (Rules(goal=2, min_reporting_fraction=0.5, **WINDOWS), window_with_enough_reports),
    (Rules(goal=1), unreachable),
    (Rules(goal=1, **WINDOWS), empty_window),
    (Rules(goal=2, min_reporting_fraction=0.5), files_changed(survivors=1)),
    (Rules(goal=2, min_reporting_fraction=1.0), files_changed(survivors=0)),
    (Rules(goal=1, rounds=1), aggregated(ok=True)),
    (Rules(goal=1, rounds=1), aggregated(ok=False)),
    (Rules(goal=1, **STOP), met_in_selection),
    (Rules(goal=1, **STOP), met_while_under_way(ok=True)),
    (Rules(goal=1, **STOP), met_while_under_way(ok=False)),
    (Rules(goal=1, rounds=2), nothing, {"number": 3}),
    (Rules(goal=1, **STOP), nothing, {"number": 2, "metrics": RoundMetrics(1, GOOD)}),
    (Rules(goal=1, **BUDGET), spent(ok=True)),
    (Rules(goal=1, **BUDGET), spent(ok=False)),
    (Rules(goal=1, **BUDGET), nothing, {"number": 2, "privacy": Spent(0.9, 1e-5, 1, 1.2)}),
]


def test_every_move_in_the_table_is_made_and_no_other(monkeypatch: pytest.MonkeyPatch) -> None:
    made: set[tuple[Stage, Cause]] = set()

    def spy(stage: Stage, cause: Cause) -> Stage:
        made.add((stage, cause))
        return next_stage(stage, cause)

    monkeypatch.setattr(rounds, "next_stage", spy)
    for rules, scenario, *made_as in SCENARIOS:
        machine = Round(rules, **(made_as[0] if made_as else {}))
        machine.start()
        scenario(machine)
    assert made == set(TRANSITIONS)


def test_a_move_outside_the_table_is_refused() -> None:
    with pytest.raises(ValueError, match="no move from COMPLETED on GOAL_REACHED"):
        next_stage(Stage.COMPLETED, Cause.GOAL_REACHED)


def test_every_stage_is_reached_and_every_one_but_finished_is_left() -> None:
    sources = {stage for stage, _ in TRANSITIONS}
    targets = set(TRANSITIONS.values())
    assert targets == set(Stage)
    assert sources == set(Stage) - {Stage.FINISHED}  # the end of the run: no way out


def test_aggregating_is_shown_as_reporting() -> None:
    assert Stage.AGGREGATING.shown is Stage.REPORTING
    assert [s.name for s in SHOWN_STAGES] == [
        "SELECTION", "CONFIGURATION", "REPORTING", "COMPLETED", "FAILED", "FINISHED",
    ]  # fmt: skip
    # The wire's values (fl_status.proto's Stages) are the first four.
    assert [Stage[name].value for name in ("SELECTION", "CONFIGURATION", "REPORTING")] == [0, 1, 2]
    assert Stage.COMPLETED.value == 3


def test_readme_shows_the_table_and_the_diagram_generated_from_it() -> None:
    readme = (REPO / "README.md").read_text()
    hint = "run .venv/bin/python scripts/gen_stage_docs.py"
    assert markdown_table() in readme, hint
    assert f"```mermaid\n{mermaid_diagram()}```" in readme, hint
