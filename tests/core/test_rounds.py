"""The pure round state machine: examples, then random event sequences (Hypothesis)."""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from fl_coordinator.core.events import (
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
from fl_coordinator.core.rounds import Round, Rules
from fl_coordinator.core.stages import Stage
from fl_coordinator.core.stopping import RoundMetrics, StopWhen

FORWARD = {Stage.SELECTION: 0, Stage.CONFIGURATION: 1, Stage.REPORTING: 2}


def replies(effects: list) -> list[tuple[object, bool]]:
    return [(e.reply_to, e.accepted) for e in effects if isinstance(e, Answer)]


def of_type(effects: list, kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


def test_goal_reached_configures_every_selector_once() -> None:
    machine = Round(Rules(goal=3))
    assert replies(machine.handle(CheckIn("a:1", 1))) == [(1, True)]
    assert replies(machine.handle(CheckIn("b:1", 2))) == [(2, True)]
    effects = machine.handle(CheckIn("a:1", 3))
    assert replies(effects) == [(3, True)]
    assert of_type(effects, Broadcast) == [Broadcast(1, ("a:1", "b:1"))]
    assert machine.stage is Stage.CONFIGURATION
    assert machine.selectors == {"a:1": 2, "b:1": 1}
    assert replies(machine.handle(CheckIn("c:1", 4))) == [(4, False)]


def report(machine: Round, selector: str, error: str | None = None) -> list:
    """A selector reports and the I/O layer's check of its files comes back."""
    effects = machine.handle(SelectorReported(selector))
    checks = of_type(effects, Validate)
    if not checks:
        return effects
    return effects + machine.handle(ContributionValidated(checks[0].round, selector, error))


def test_reports_then_aggregation_then_next_round() -> None:
    machine = Round(Rules(goal=2))
    machine.handle(CheckIn("a:1", 1))
    machine.handle(CheckIn("b:1", 2))
    effects = report(machine, "a:1")
    assert machine.stage is Stage.REPORTING and not of_type(effects, Aggregate)
    effects = report(machine, "b:1")
    assert of_type(effects, Aggregate) == [Aggregate(1, ("a:1", "b:1"))]
    effects = machine.handle(AggregationDone(1, seconds=0.25))
    statuses = of_type(effects, Status)
    assert [(s.round, s.stage) for s in statuses] == [(1, Stage.COMPLETED), (2, Stage.SELECTION)]
    assert statuses[0].aggregation_seconds == 0.25
    assert (machine.number, machine.accepted, machine.selectors) == (2, 0, {})


def test_an_accountant_that_fails_ends_a_run_with_a_budget_and_only_such_a_run() -> None:
    """The privacy spent is unknown: a budget fails closed; without one, rounds go on."""
    for budget, stages in ((5.0, [Stage.COMPLETED, Stage.FINISHED]),
                           (None, [Stage.COMPLETED, Stage.SELECTION])):  # fmt: skip
        machine = Round(Rules(goal=1, dp_clip_norm=1.0, max_epsilon=budget))
        machine.handle(CheckIn("a:1", 1))
        report(machine, "a:1")
        effects = machine.handle(AggregationDone(1, seconds=0.1, unaccounted="ValueError: q"))
        assert [s.stage for s in of_type(effects, Status)] == stages
    assert machine.finished is None
    finished = Round(Rules(goal=1, dp_clip_norm=1.0, max_epsilon=5.0))
    finished.handle(CheckIn("a:1", 1))
    report(finished, "a:1")
    finished.handle(AggregationDone(1, unaccounted="ValueError: q"))
    assert finished.finished == (
        "the privacy spent cannot be computed (ValueError: q), so no further round may be "
        "released under DP_MAX_EPSILON=5; fix the cause and restart"
    )


def test_failed_aggregation_opens_next_round_with_error_status() -> None:
    machine = Round(Rules(goal=1))
    machine.handle(CheckIn("a:1", 1))
    report(machine, "a:1")
    effects = machine.handle(AggregationDone(1, error="a:1/fl_agg_checkpoint is missing"))
    failed = of_type(effects, Status)[0]
    assert (failed.stage, failed.error) == (Stage.FAILED, "a:1/fl_agg_checkpoint is missing")
    assert machine.number == 2 and machine.stage is Stage.SELECTION


def test_a_report_the_coordinator_could_not_check_fails_the_round_and_blames_nobody() -> None:
    """Out of its own descriptors, the coordinator cannot check a report: the round fails
    with the checker's reason (as when an aggregation fails as ours), the selector is not
    rejected, the global checkpoint is not replaced (no Aggregate), the next round opens;
    a late one (the round ended meanwhile) changes nothing. Before, it was a rejection."""
    machine = Round(Rules(goal=3, min_reporting_fraction=0.3))
    for token, selector in enumerate(("a:1", "b:1", "c:1")):
        machine.handle(CheckIn(selector, token))
    report(machine, "a:1")
    machine.handle(SelectorReported("b:1"))
    machine.handle(SelectorReported("c:1"))
    reason = "b:1: these files could not be checked: ... raise RLIMIT_NOFILE"
    effects = machine.handle(Unchecked(1, "b:1", reason))
    failed = of_type(effects, Status)[0]
    assert (failed.round, failed.stage, failed.error) == (1, Stage.FAILED, reason)
    assert (failed.reported, failed.rejected) == (("a:1",), ())
    assert of_type(effects, Aggregate) == []
    assert [line.level for line in of_type(effects, Log)] == ["ERROR", "INFO"]
    assert reason in of_type(effects, Log)[0].message
    assert (machine.number, machine.stage) == (2, Stage.SELECTION)
    late = machine.handle(Unchecked(1, "c:1", reason))
    assert late == [Log("INFO", "round 1: late validation of c:1; ignored")]
    assert (machine.number, machine.stage, machine.rejected) == (2, Stage.SELECTION, {})


def test_files_refused_while_averaging_reject_their_selector_and_the_rest_is_averaged() -> None:
    machine = Round(Rules(goal=3, min_reporting_fraction=0.5))
    for token, selector in enumerate(("a:1", "a:1", "b:1")):
        machine.handle(CheckIn(selector, token))
    report(machine, "a:1")
    assert of_type(report(machine, "b:1"), Aggregate) == [Aggregate(1, ("a:1", "b:1"))]
    effects = machine.handle(AggregationDone(1, rejected=(("b:1", "b changed"),)))
    assert of_type(effects, Aggregate) == [Aggregate(1, ("a:1",))]  # a holds 2 of 3 clients
    assert (machine.reported, machine.rejected, machine.aggregating) == (
        ["a:1"],
        {"b:1": "b changed"},
        True,
    )
    effects = machine.handle(AggregationDone(1, rejected=(("a:1", "a changed"),)))
    failed = of_type(effects, Status)[0]
    assert (failed.stage, failed.rejected) == (
        Stage.FAILED,
        (("b:1", "b changed"), ("a:1", "a changed")),
    )
    assert "only 0 of 3 client(s) reported usable updates" in failed.error
    assert of_type(effects, Aggregate) == [] and machine.number == 2


def test_reports_that_change_nothing_but_are_shown() -> None:
    machine = Round(Rules(goal=2))
    machine.handle(CheckIn("a:1", 1))
    early = machine.handle(SelectorReported("a:1"))  # still selecting
    machine.handle(CheckIn("b:1", 2))
    stranger = machine.handle(SelectorReported("x:1"))  # not in round
    report(machine, "a:1")
    twice = machine.handle(SelectorReported("a:1"))
    hostile = machine.handle(Refused("../x", "check-in refused: contains a path separator"))
    for effects in (early, stranger, twice, hostile):
        assert of_type(effects, Validate) == [] and of_type(effects, Aggregate) == []
    assert (
        machine.reported == ["a:1"] and machine.accepted == 2 and machine.stage.name == "REPORTING"
    )
    assert of_type(hostile, Status)[0].ignored == (
        ("a:1", "round is in SELECTION, no report expected"),
        ("x:1", "not a selector of this round"),
        ("a:1", "it already reported"),
        ("../x", "check-in refused: contains a path separator"),
    )


def test_check_ins_during_aggregation_are_held_for_next_round() -> None:
    machine = Round(Rules(goal=2))
    machine.handle(CheckIn("a:1", 1, clients=2))
    report(machine, "a:1")
    assert replies(machine.handle(CheckIn("b:1", 2))) == []
    assert of_type(machine.handle(CheckIn("c:1", 3, clients=5)), Status)[0].held == 2
    effects = machine.handle(AggregationDone(1))
    assert replies(effects) == [(2, 1), (3, 1)]  # first come, first served: c:1 gets 1 of 5
    assert of_type(effects, Broadcast) == [Broadcast(2, ("b:1", "c:1"))]
    assert machine.number == 2 and machine.stage is Stage.CONFIGURATION


def test_check_ins_beyond_the_next_rounds_goal_are_refused_at_once_while_aggregating() -> None:
    """Held check-ins stop at the next round's goal: the next one is refused at once (as it
    would be when that round opens), and a withdrawal makes room again.

    Before: every check-in during an aggregation was held, its call and its memory, until
    the next round opened and refused those past the goal: a flood during a long
    aggregation held without bound (rt12).
    """
    machine = Round(Rules(goal=3))
    machine.handle(CheckIn("a:1", 1, clients=3))
    report(machine, "a:1")
    assert machine.aggregating
    assert replies(machine.handle(CheckIn("b:1", 2, clients=2))) == []
    assert replies(machine.handle(CheckIn("c:1", 3, clients=4))) == []  # crosses the goal
    effects = machine.handle(CheckIn("d:1", 4))
    assert replies(effects) == [(4, 0)]
    why = (
        "check-in refused: the check-ins held for round 2 already bring its goal of 3 "
        "client(s); check in again once its selection opens"
    )
    assert of_type(effects, Status)[0].ignored == (("d:1", why),)
    assert (len(machine.held), machine.held_clients) == (2, 6)
    machine.handle(Withdrawn("c:1", 3))
    assert replies(machine.handle(CheckIn("e:1", 5))) == []  # 2 held: room for one more
    assert replies(machine.handle(CheckIn("f:1", 6))) == [(6, 0)]
    effects = machine.handle(AggregationDone(1))
    assert replies(effects) == [(2, 2), (5, 1)]
    assert of_type(effects, Broadcast) == [Broadcast(2, ("b:1", "e:1"))]
    assert (machine.held, machine.held_clients) == ({}, 0)


def test_a_withdrawn_held_check_in_is_never_admitted() -> None:
    machine = Round(Rules(goal=2))
    machine.handle(CheckIn("a:1", 1, clients=2))
    report(machine, "a:1")
    machine.handle(CheckIn("b:1", 2))
    machine.handle(CheckIn("c:1", 3, clients=2))
    assert of_type(machine.handle(Withdrawn("b:1", 2)), Status)[0].held == 1
    assert machine.handle(Withdrawn("b:1", 2)) == []  # once; and unknown callers change nothing
    effects = machine.handle(AggregationDone(1))
    assert replies(effects) == [(3, 2)]
    assert of_type(effects, Broadcast) == [Broadcast(2, ("c:1",))]


def test_answer_to_goal_count_reached_outside_configuration_is_ignored() -> None:
    """Found by Hypothesis: a drop during SELECTION let the round accept more than the goal."""
    machine = Round(Rules(goal=3))
    machine.handle(CheckIn("a:1", 1))
    machine.handle(BroadcastDone(1, "a:1", error="timed out"))
    assert machine.selectors == {"a:1": 1} and machine.unreachable == []
    replies_ = [replies(machine.handle(CheckIn("a:1", n)))[0][1] for n in range(2, 5)]
    assert replies_ == [True, True, False]


def test_stale_aggregation_result_is_ignored() -> None:

    machine = Round(Rules(goal=1))
    assert of_type(machine.handle(AggregationDone(1)), Status) == []
    assert machine.number == 1


# -- time windows, drops and rejections ------------------------------------------


def test_selection_window_goes_on_with_enough_clients() -> None:
    machine = Round(Rules(goal=4, selection_timeout=30, min_checkin_fraction=0.5))
    assert of_type(machine.start(), Arm) == [Arm(1, Stage.SELECTION, 30)]
    machine.handle(CheckIn("a:1", 1))
    machine.handle(CheckIn("b:1", 2))
    effects = machine.handle(WindowClosed(1, Stage.SELECTION))
    assert of_type(effects, Broadcast) == [Broadcast(1, ("a:1", "b:1"))]
    assert machine.stage is Stage.CONFIGURATION and machine.accepted == 2


def test_selection_window_abandons_round_without_enough_clients() -> None:
    machine = Round(Rules(goal=4, selection_timeout=30, min_checkin_fraction=0.5))
    machine.handle(CheckIn("a:1", 1))
    effects = machine.handle(WindowClosed(1, Stage.SELECTION))
    failed = of_type(effects, Status)[0]
    assert failed.stage is Stage.FAILED
    assert (
        failed.error == "selection window of 30 s closed with 1/4 client(s); at least 2 are needed"
    )
    assert (machine.number, machine.stage, machine.accepted) == (2, Stage.SELECTION, 0)
    assert of_type(effects, Arm) == [Arm(2, Stage.SELECTION, 30)]
    # The window of the abandoned round closing again changes nothing.
    assert machine.handle(WindowClosed(1, Stage.SELECTION)) == []


def test_unreachable_selector_is_dropped_and_the_rest_goes_on() -> None:
    machine = Round(Rules(goal=3))
    for token, selector in enumerate(["a:1", "b:1", "a:1"]):
        machine.handle(CheckIn(selector, token))
    report(machine, "a:1")
    effects = machine.handle(BroadcastDone(1, "b:1", error="timed out"))
    assert machine.selectors == {"a:1": 2} and machine.accepted == 2
    assert machine.unreachable == ["b:1"]
    assert of_type(effects, Aggregate) == [Aggregate(1, ("a:1",))]


def test_no_selector_reachable_abandons_the_round() -> None:
    machine = Round(Rules(goal=1))
    machine.handle(CheckIn("a:1", 1))
    effects = machine.handle(BroadcastDone(1, "a:1", error="connection refused"))
    assert (
        of_type(effects, Status)[0].error == "no selector of the round could be told to configure"
    )
    assert machine.number == 2


def test_rejected_contribution_follows_the_reporting_fraction() -> None:
    machine = Round(Rules(goal=4, min_reporting_fraction=0.5))
    for token, selector in enumerate(["a:1", "a:1", "b:1", "c:1"]):
        machine.handle(CheckIn(selector, token))
    report(machine, "b:1", error="weight is 0")
    report(machine, "c:1", error="NaN")
    effects = report(machine, "a:1")  # a:1 held 2 of 4 clients: enough
    assert of_type(effects, Aggregate) == [Aggregate(1, ("a:1",))]
    assert dict(of_type(effects, Status)[-1].rejected) == {"b:1": "weight is 0", "c:1": "NaN"}

    machine = Round(Rules(goal=4, min_reporting_fraction=0.75))
    for token, selector in enumerate(["a:1", "a:1", "b:1", "c:1"]):
        machine.handle(CheckIn(selector, token))
    report(machine, "b:1", error="weight is 0")
    report(machine, "c:1")
    effects = report(machine, "a:1")  # 3 of 4 clients usable: exactly enough
    assert of_type(effects, Aggregate) == [Aggregate(1, ("c:1", "a:1"))]


def test_reporting_window_aggregates_what_arrived_or_abandons() -> None:
    rules = Rules(goal=3, reporting_timeout=60, min_reporting_fraction=0.5)
    machine = Round(rules)
    for token, selector in enumerate(["a:1", "a:1", "b:1"]):
        effects = machine.handle(CheckIn(selector, token))
    assert Arm(1, Stage.REPORTING, 60) in effects
    report(machine, "a:1")
    effects = machine.handle(WindowClosed(1, Stage.REPORTING))
    assert of_type(effects, Aggregate) == [Aggregate(1, ("a:1",))]
    assert of_type(report(machine, "b:1"), Validate) == []  # too late: logged and ignored

    machine = Round(rules)
    for token, selector in enumerate(["a:1", "b:1", "b:1"]):
        machine.handle(CheckIn(selector, token))
    report(machine, "a:1")
    effects = machine.handle(WindowClosed(1, Stage.REPORTING))
    assert "only 1 of 3 client(s) reported" in of_type(effects, Status)[0].error
    assert machine.number == 2


def test_an_empty_selection_window_is_not_a_failure() -> None:
    machine = Round(Rules(goal=2, selection_timeout=30))
    machine.start()
    for _ in range(3):  # an idle federation: the same round waits, window after window
        effects = machine.handle(WindowClosed(1, Stage.SELECTION))
        assert of_type(effects, Arm) == [Arm(1, Stage.SELECTION, 30)]
        assert of_type(effects, Status) == []
        assert [e.level for e in of_type(effects, Log)] == ["DEBUG"]
    assert (machine.number, machine.stage) == (1, Stage.SELECTION)
    machine.handle(CheckIn("a:1", 1))
    machine.handle(CheckIn("a:1", 2))
    assert (machine.number, machine.stage) == (1, Stage.CONFIGURATION)


def test_the_shortfall_names_how_many_clients_are_needed() -> None:
    machine = Round(Rules(goal=1, min_reporting_fraction=0.001))
    machine.handle(CheckIn("a:1", 1))
    failed = of_type(report(machine, "a:1", error="bad file"), Status)[-2]
    assert failed.error == (
        "every selector answered but only 0 of 1 client(s) reported usable updates; "
        "1 are needed (MIN_REPORTING_FRACTION=0.001)"
    )


def test_a_released_client_is_no_longer_counted_while_selecting() -> None:
    machine = Round(Rules(goal=3))
    machine.handle(CheckIn("a:1", 1, clients=2))
    effects = machine.handle(Release("a:1", "r1", clients=1, round=1))
    assert of_type(effects, AnswerRelease) == [AnswerRelease("r1", 1)]
    assert (machine.accepted, machine.selectors) == (1, {"a:1": 1})
    # More than it holds releases what it holds, and the selector leaves the round.
    assert of_type(machine.handle(Release("a:1", "r2", 5, 1)), AnswerRelease)[0].released == 1
    assert (machine.accepted, machine.selectors) == (0, {})
    # The goal now needs three new clients: nothing was counted twice.
    for token in range(3):
        machine.handle(CheckIn("b:1", token))
    assert machine.stage is Stage.CONFIGURATION and machine.selectors == {"b:1": 3}


def test_a_release_after_the_goal_or_for_another_round_changes_nothing() -> None:
    machine = Round(Rules(goal=1))
    machine.handle(CheckIn("a:1", 1))  # goal reached: configuring
    assert of_type(machine.handle(Release("a:1", "r", 1, 1)), AnswerRelease)[0].released == 0
    assert machine.accepted == 1
    machine = Round(Rules(goal=2), number=5)
    machine.handle(CheckIn("a:1", 1))
    assert of_type(machine.handle(Release("a:1", "r", 1, 4)), AnswerRelease)[0].released == 0
    assert machine.accepted == 1


def test_check_in_answers_name_their_round() -> None:
    machine = Round(Rules(goal=1), number=7)
    assert of_type(machine.handle(CheckIn("a:1", "t")), Answer) == [Answer("t", 1, round=7)]


def test_a_report_for_another_round_is_refused_and_said_so() -> None:
    machine = Round(Rules(goal=1), number=5)
    machine.handle(CheckIn("a:1", 1))
    stale = machine.handle(SelectorReported("a:1", round=4, reply_to="s"))
    assert of_type(stale, AnswerReport) == [AnswerReport("s", taken=False)]
    assert of_type(stale, Validate) == []
    assert machine.ignored[-1] == ("a:1", "it is for round 4, not this one")
    current = machine.handle(SelectorReported("a:1", round=5, reply_to="c"))
    assert of_type(current, AnswerReport) == [AnswerReport("c", taken=True)]
    assert of_type(current, Validate) == [Validate(5, "a:1")]


def test_a_long_stage_is_said_calmly() -> None:
    machine = Round(Rules(goal=6))
    for token in range(3):
        machine.handle(CheckIn("a:1", token))
    (line,) = of_type(machine.handle(StillWaiting(1, 60)), Log)
    assert line == Log(
        "INFO",
        "round 1: waiting for clients: 3/6 accepted for 60 s (SELECTION_TIMEOUT=0: no time limit)",
    )
    assert machine.handle(StillWaiting(0, 60)) == []  # an older round's timer
    for token in range(3):
        machine.handle(CheckIn("b:1", token))
    (line,) = of_type(machine.handle(StillWaiting(1, 120)), Log)
    assert "waiting for reports: 0 of 2 selector(s) reported, 0 being validated, for 120 s" in (
        line.message
    )


# -- property-based -----------------------------------------------------------

SELECTORS = [f"10.0.0.{i}:5000" for i in range(4)]

operations = st.lists(
    st.one_of(
        # 1 client: ClientCountUpdate; more: the batched CheckInClients.
        st.tuples(st.just("check_in"), st.sampled_from(SELECTORS), st.sampled_from([1, 1, 2, 7])),
        st.tuples(st.just("report"), st.sampled_from(SELECTORS)),
        st.tuples(st.just("report_round"), st.sampled_from(SELECTORS), st.integers(-1, 0)),
        st.tuples(st.just("release"), st.sampled_from(SELECTORS), st.integers(1, 3)),
        st.tuples(st.just("aggregated"), st.booleans()),
        st.tuples(st.just("stale"), st.integers(0, 5)),
        st.tuples(st.just("refused"), st.integers(0, 3)),
        st.tuples(st.just("told"), st.sampled_from(SELECTORS)),
        st.tuples(st.just("unreachable"), st.sampled_from(SELECTORS)),
        st.tuples(st.just("checked"), st.booleans()),
        st.tuples(st.just("unchecked")),
        st.tuples(st.just("window"), st.sampled_from([Stage.SELECTION, Stage.REPORTING])),
        st.tuples(st.just("evaluated"), st.sampled_from([0.1, 0.9, None])),
        st.tuples(st.just("withdrawn"), st.integers(0, 3)),
    ),
    max_size=150,
)


def to_event(machine: Round, op: tuple, tokens: itertools.count) -> Event:
    match op:
        case ("check_in", selector, clients):
            return CheckIn(selector, reply_to=(next(tokens), selector), clients=clients)
        case ("report", selector):
            return SelectorReported(selector)
        case ("report_round", selector, offset):
            return SelectorReported(selector, machine.number + offset, reply_to=next(tokens))
        case ("release", selector, clients):
            return Release(selector, next(tokens), clients, machine.number)
        case ("aggregated", ok):
            return AggregationDone(machine.number, error=None if ok else "broken file")
        case ("stale", offset):
            return AggregationDone(machine.number - offset - 1)
        case ("refused", index):  # a reported selector's files changed since their check
            reported = machine.reported or list(SELECTORS)
            refused = reported[index % len(reported)]
            return AggregationDone(machine.number, rejected=((refused, "changed"),))
        case ("told", selector):
            return BroadcastDone(machine.number, selector)
        case ("unreachable", selector):
            return BroadcastDone(machine.number, selector, error="timed out")
        case ("checked", ok):
            selector = machine.validating[0] if machine.validating else SELECTORS[0]
            return ContributionValidated(machine.number, selector, None if ok else "bad file")
        case ("unchecked",):  # the coordinator ran out of descriptors checking it
            selector = machine.validating[0] if machine.validating else SELECTORS[0]
            return Unchecked(machine.number, selector, "out of descriptors")
        case ("window", stage):
            return WindowClosed(machine.number, stage)
        case ("evaluated", accuracy):  # the last completed round's metrics, or none
            if accuracy is None:
                return Evaluated(machine.number - 1, error="it raised")
            return Evaluated(machine.number - 1, (("accuracy", accuracy),))
        case ("withdrawn", index):  # a held caller's connection closed (or one answered)
            callers = [c.reply_to for c in machine.held.values()] or [(0, SELECTORS[0])]
            return Withdrawn(SELECTORS[0], callers[index % len(callers)])
    raise AssertionError(op)


@settings(max_examples=300, deadline=None)
@given(
    goal=st.integers(1, 5),
    fractions=st.tuples(st.sampled_from([0.25, 0.5, 1.0]), st.sampled_from([0.25, 0.5, 1.0])),
    ops=operations,
    rounds=st.integers(0, 3),
    stop=st.booleans(),
)
def test_random_event_sequences_keep_the_invariants(
    goal: int, fractions: tuple[float, float], ops: list[tuple], rounds: int, stop: bool
) -> None:
    stop_when = StopWhen.parse("accuracy>=0.5") if stop else None
    rules = Rules(goal, 10, fractions[0], 20, fractions[1], rounds=rounds, stop_when=stop_when,
                  evaluate=stop)  # fmt: skip
    machine = Round(rules)
    machine.start()
    tokens = itertools.count()
    asked: dict[object, int] = {}
    answered: Counter[object] = Counter()
    withdrawn: set[object] = set()
    finished_rounds = 0
    accepted_total = 0
    released_total = 0
    finished_accepted = 0
    last: Status = machine.status()

    for op in ops:
        event = to_event(machine, op, tokens)
        if isinstance(event, CheckIn):
            asked[event.reply_to] = event.clients
        if isinstance(event, Withdrawn) and event.reply_to in {
            c.reply_to for c in machine.held.values()
        }:
            withdrawn.add(event.reply_to)
        effects = machine.handle(event)

        # Never more than the goal accepted in a round; selectors hold exactly those.
        assert 0 <= machine.accepted <= goal
        assert sum(machine.selectors.values()) == machine.accepted
        assert set(machine.reported) <= set(machine.selectors)

        for effect in effects:
            if isinstance(effect, Answer):
                answered[effect.reply_to] += 1
                accepted_total += effect.accepted
                # A batch gets at most what it asked for.
                assert 0 <= effect.accepted <= asked[effect.reply_to]
            if isinstance(effect, AnswerRelease):
                # A release gives back at most what it names; those clients may come again.
                released_total += effect.released
                assert 0 <= effect.released <= event.clients

            if isinstance(effect, Broadcast):
                # Every selector holding an accepted client is told, once, in its round.
                assert effect.round == machine.number
                assert effect.selectors == tuple(machine.selectors)
                assert goal >= sum(machine.selectors.values()) >= machine.rules.min_clients
            if isinstance(effect, Aggregate):
                # Only selectors that reported usable files, enough of them, are averaged.
                assert effect.selectors == tuple(machine.reported)
                held = sum(machine.selectors[s] for s in effect.selectors)
                assert held >= machine.rules.min_reporting_fraction * machine.accepted - 1e-9
            if last.stage is Stage.FINISHED:  # the end: nothing more happens
                assert not isinstance(effect, Broadcast | Aggregate | Evaluate | Validate)
                assert not isinstance(effect, Answer) or effect.accepted == 0
            if isinstance(effect, Evaluate):
                assert stop and effect.round == last.round and last.stage is Stage.COMPLETED
            if isinstance(effect, Status) and effect.stage is Stage.FINISHED:
                # Finished after the last round, or on metrics that meet STOP_WHEN.
                assert effect.round == last.round and effect.finished
                assert last.stage in (Stage.COMPLETED, Stage.FAILED, Stage.SELECTION,
                                      Stage.FINISHED)  # fmt: skip
                assert (rounds and effect.round >= rounds) or stop
                last = effect
            elif isinstance(effect, Status):
                # Stages only move forward within a round; rounds grow by exactly one.
                assert last.stage is not Stage.FINISHED
                if effect.round == last.round:
                    if effect.stage in FORWARD and last.stage in FORWARD:
                        assert FORWARD[effect.stage] >= FORWARD[last.stage]
                    else:
                        assert last.stage in FORWARD, (last, effect)
                else:
                    assert effect.round == last.round + 1
                    assert last.stage in (Stage.COMPLETED, Stage.FAILED)
                    assert effect.stage is Stage.SELECTION
                if effect.stage in (Stage.COMPLETED, Stage.FAILED):
                    finished_rounds += 1
                    finished_accepted += effect.accepted
                last = effect

        ended_here = machine.stage is Stage.FINISHED and last.round == finished_rounds
        assert machine.number == finished_rounds + (0 if ended_here else 1)
        assert rounds == 0 or machine.number <= rounds + 1

    # Every check-in is answered exactly once, or still held for the next round, or was
    # withdrawn while held (and never answered).
    held = {c.reply_to for c in machine.held.values()}
    # Check-ins are held only while those before them ask for fewer clients than the goal.
    asked_before = [c.clients for c in machine.held.values()][:-1]
    assert machine.held_clients == sum(c.clients for c in machine.held.values())
    assert sum(asked_before) < goal or not machine.held
    assert all(count == 1 for count in answered.values())
    assert set(answered) | held | withdrawn == set(asked)
    assert not set(answered) & held and not set(answered) & withdrawn and not held & withdrawn
    # Accepted answers never exceed the goal per round, but for clients released while
    # selecting (drops only lower the count).
    assert accepted_total - released_total <= goal * machine.number


def test_selectors_outside_the_allow_list_are_refused_and_ignored() -> None:
    machine = Round(Rules(goal=2, allowed=frozenset({"a:1"})))
    effects = machine.handle(CheckIn("b:1", 1))
    assert replies(effects) == [(1, False)]
    assert machine.accepted == 0 and machine.selectors == {}
    assert machine.ignored == [("b:1", "check-in refused: not in ALLOWED_SELECTORS")]
    assert replies(machine.handle(CheckIn("a:1", 2))) == [(2, True)]
    machine.handle(SelectorReported("b:1"))
    assert machine.ignored[-1] == ("b:1", "not in ALLOWED_SELECTORS")


def test_distinct_selectors_per_round_are_capped_and_the_cap_resets() -> None:
    machine = Round(Rules(goal=3, max_selectors=2))
    assert replies(machine.handle(CheckIn("a:1", 1))) == [(1, True)]
    assert replies(machine.handle(CheckIn("b:1", 2))) == [(2, True)]
    assert replies(machine.handle(CheckIn("c:1", 3))) == [(3, False)]  # a third selector
    assert replies(machine.handle(CheckIn("b:1", 4))) == [(4, True)]  # a known one: goal
    assert machine.selectors == {"a:1": 1, "b:1": 2}
    machine.handle(WindowClosed(1, Stage.SELECTION))  # (no window armed: ignored)
    for selector in ("a:1", "b:1"):
        machine.handle(BroadcastDone(1, selector, error="gone"))
    assert machine.number == 2  # round 1 abandoned; the cap counts afresh
    assert replies(machine.handle(CheckIn("c:1", 5))) == [(5, True)]


def test_lines_a_selector_can_repeat_are_throttled_by_kinds_in_our_words() -> None:
    """Every line a call can cause has a kind (so it is counted, not written, when
    repeated), and no number from the call is in it: 3,000 calls with other rounds
    and client counts, in every stage a selector can reach, give a handful of kinds."""
    lines: list[Log] = []
    for goal in (1, 3):
        machine = Round(Rules(goal=goal), number=5)
        machine.start()
        for n in range(500):
            for event in (
                SelectorReported("a:1", round=100 + n, reply_to=n),
                Release("a:1", n, clients=1 + n, round=200 + n),
                CheckIn("a:1", n, clients=1),
                Release("a:1", n, clients=1, round=machine.number),
                SelectorReported("b:1", reply_to=n),
                Refused("a:1", f"report ignored: invalid id of {n} bytes"),
            ):
                lines += of_type(machine.handle(event), Log)
    repeatable = [line for line in lines if "goal of" not in line.message]
    assert len(repeatable) > 3000
    assert [line for line in repeatable if not line.kind] == []
    kinds = {line.kind for line in repeatable}
    assert len(kinds) <= 8, kinds
    assert not any(char.isdigit() for kind in kinds for char in kind), kinds


# -- the end of a run: ROUNDS, STOP_WHEN, evaluations ------------------------------------


def complete(machine: Round, selector: str = "a:1") -> list:
    """One whole round of one client at ``selector``; the effects of its completion."""
    machine.handle(CheckIn(selector, ("round", machine.number)))
    report(machine, selector)
    return machine.handle(AggregationDone(machine.number, seconds=0.1))


def test_the_last_round_finishes_the_run_and_check_ins_are_refused_after() -> None:
    machine = Round(Rules(goal=1, rounds=2))
    machine.start()
    complete(machine)
    effects = complete(machine)
    finished = of_type(effects, Status)[-1]
    assert (finished.round, finished.stage) == (2, Stage.FINISHED)
    assert (
        finished.finished == "round 2 was the last (ROUNDS=2); to go on, raise ROUNDS and restart"
    )
    assert replies(machine.handle(CheckIn("b:1", "late"))) == [("late", False)]
    assert of_type(machine.handle(SelectorReported("b:1")), Status)[0].stage is Stage.FINISHED
    assert (machine.number, machine.stage) == (2, Stage.FINISHED)


def test_check_ins_held_during_the_last_aggregation_are_refused() -> None:
    machine = Round(Rules(goal=1, rounds=1))
    machine.handle(CheckIn("a:1", 1))
    report(machine, "a:1")
    assert machine.handle(CheckIn("b:1", "held")) == [machine.status()]  # held, not answered
    effects = machine.handle(AggregationDone(1))
    assert replies(effects) == [("held", False)]
    assert machine.held == {} and machine.stage is Stage.FINISHED


def test_a_check_that_ends_after_the_last_round_was_abandoned_changes_nothing() -> None:
    machine = Round(Rules(goal=1, rounds=1, reporting_timeout=60))
    machine.handle(CheckIn("a:1", 1))
    checks = of_type(machine.handle(SelectorReported("a:1")), Validate)
    assert checks == [Validate(1, "a:1")]
    effects = machine.handle(WindowClosed(1, Stage.REPORTING))  # its check is still running
    assert [s.stage for s in of_type(effects, Status)] == [Stage.FAILED, Stage.FINISHED]
    assert machine.validating == []
    effects = machine.handle(ContributionValidated(1, "a:1", "bad file"))
    assert of_type(effects, Status) == [] and machine.rejected == {}
    assert (machine.number, machine.stage) == (1, Stage.FINISHED)


def test_metrics_that_meet_stop_when_finish_at_once_while_selecting() -> None:
    rules = Rules(goal=1, evaluate=True, stop_when=StopWhen.parse("accuracy>=0.9"))
    machine = Round(rules)
    machine.start()
    assert of_type(complete(machine), Evaluate) == [Evaluate(1)]  # and round 2 opened at once
    assert (machine.number, machine.stage) == (2, Stage.SELECTION)
    effects = machine.handle(Evaluated(1, (("accuracy", 0.8), ("loss", 0.5))))
    assert of_type(effects, Status)[-1].metrics == RoundMetrics(
        1, (("accuracy", 0.8), ("loss", 0.5))
    )
    assert machine.stage is Stage.SELECTION  # not met
    effects = machine.handle(Evaluated(2, (("accuracy", 0.95),)))  # a later round's, say
    status = of_type(effects, Status)[-1]
    assert (status.round, status.stage) == (2, Stage.FINISHED)
    assert status.finished.startswith("round 2's accuracy=0.95 meets STOP_WHEN accuracy>=0.9")


def test_metrics_met_while_a_round_runs_finish_the_run_when_it_ends() -> None:
    rules = Rules(goal=1, evaluate=True, stop_when=StopWhen.parse("accuracy>=0.9"))
    machine = Round(rules)
    complete(machine)
    machine.handle(CheckIn("a:1", "r2"))  # round 2 configures: its clients train
    machine.handle(Evaluated(1, (("accuracy", 0.92),)))
    assert machine.stage is Stage.CONFIGURATION and machine.stopping is not None
    report(machine, "a:1")
    effects = machine.handle(AggregationDone(2))
    stages = [(s.round, s.stage) for s in of_type(effects, Status)]
    assert stages == [(2, Stage.COMPLETED), (2, Stage.FINISHED)]
    assert of_type(effects, Evaluate) == [Evaluate(2)]  # the last round is evaluated too
    assert machine.handle(Evaluated(2, (("accuracy", 0.93),)))[-1].metrics.round == 2


def test_evaluations_that_fail_or_come_late_change_nothing() -> None:
    machine = Round(Rules(goal=1, evaluate=True, stop_when=StopWhen.parse("loss<0.1")))
    complete(machine)
    complete(machine)
    effects = machine.handle(Evaluated(1, error="it raised ValueError"))
    assert effects == [Log("WARNING", "round 1: no metrics (it raised ValueError)")]
    machine.handle(Evaluated(2, (("loss", 0.5),)))
    assert of_type(machine.handle(Evaluated(1, (("loss", 0.01),))), Status) == []  # older
    assert machine.metrics == RoundMetrics(2, (("loss", 0.5),))
    assert machine.stage is Stage.SELECTION


def test_a_restart_of_a_finished_run_stays_finished_until_the_settings_change() -> None:
    machine = Round(Rules(goal=1, rounds=2), number=3)  # the journal's round 2 had ended
    status = of_type(machine.start(), Status)[0]
    assert (status.round, status.stage) == (2, Stage.FINISHED)
    assert "raise ROUNDS" in status.finished
    raised = Round(Rules(goal=1, rounds=5), number=3)
    assert of_type(raised.start(), Status)[0].stage is Stage.SELECTION
    met = RoundMetrics(4, (("accuracy", 0.99),))
    stop = Rules(goal=1, evaluate=True, stop_when=StopWhen.parse("accuracy>=0.9"))
    assert Round(stop, number=6, metrics=met).start()[-1].stage is Stage.FINISHED
    other = Rules(goal=1, evaluate=True, stop_when=StopWhen.parse("accuracy>=0.995"))
    assert Round(other, number=6, metrics=met).start()[1].stage is Stage.SELECTION


def test_a_robust_combination_needs_its_selectors() -> None:
    machine = Round(Rules(goal=2, min_selectors=3))
    machine.handle(CheckIn("a:1", 1))
    machine.handle(CheckIn("b:1", 2))
    report(machine, "a:1")
    failed = of_type(report(machine, "b:1"), Status)[-2]  # then round 2 opens
    assert failed.stage is Stage.FAILED
    assert failed.error == (
        "every selector answered but only 2 selector(s) reported usable updates; "
        "ROBUST_AGGREGATION needs 3"
    )
