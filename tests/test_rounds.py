"""The pure round state machine: examples, then random event sequences (Hypothesis)."""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from fl_coordinator.rounds import (
    Aggregate,
    AggregationDone,
    Broadcast,
    BroadcastDone,
    CheckIn,
    Event,
    Reply,
    Round,
    SelectorReported,
    Stage,
    Status,
)

FORWARD = {Stage.SELECTION: 0, Stage.CONFIGURATION: 1, Stage.REPORTING: 2}


def replies(effects: list) -> list[tuple[object, bool]]:
    return [(e.reply_to, e.accepted) for e in effects if isinstance(e, Reply)]


def of_type(effects: list, kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


def test_goal_reached_configures_every_selector_once() -> None:
    machine = Round(goal=3)
    assert replies(machine.handle(CheckIn("a:1", 1))) == [(1, True)]
    assert replies(machine.handle(CheckIn("b:1", 2))) == [(2, True)]
    effects = machine.handle(CheckIn("a:1", 3))
    assert replies(effects) == [(3, True)]
    assert of_type(effects, Broadcast) == [Broadcast(1, ("a:1", "b:1"))]
    assert machine.stage is Stage.CONFIGURATION
    assert machine.selectors == {"a:1": 2, "b:1": 1}
    assert replies(machine.handle(CheckIn("c:1", 4))) == [(4, False)]


def test_reports_then_aggregation_then_next_round() -> None:
    machine = Round(goal=2)
    machine.handle(CheckIn("a:1", 1))
    machine.handle(CheckIn("b:1", 2))
    effects = machine.handle(SelectorReported("a:1"))
    assert machine.stage is Stage.REPORTING and not of_type(effects, Aggregate)
    effects = machine.handle(SelectorReported("b:1"))
    assert of_type(effects, Aggregate) == [Aggregate(1, ("a:1", "b:1"))]
    effects = machine.handle(AggregationDone(1, seconds=0.25))
    statuses = of_type(effects, Status)
    assert [(s.round, s.stage) for s in statuses] == [(1, Stage.COMPLETED), (2, Stage.SELECTION)]
    assert statuses[0].aggregation_seconds == 0.25
    assert (machine.number, machine.accepted, machine.selectors) == (2, 0, {})


def test_failed_aggregation_opens_next_round_with_error_status() -> None:
    machine = Round(goal=1)
    machine.handle(CheckIn("a:1", 1))
    machine.handle(SelectorReported("a:1"))
    effects = machine.handle(AggregationDone(1, error="a:1/fl_agg_checkpoint is missing"))
    failed = of_type(effects, Status)[0]
    assert (failed.stage, failed.error) == (Stage.FAILED, "a:1/fl_agg_checkpoint is missing")
    assert machine.number == 2 and machine.stage is Stage.SELECTION


def test_reports_that_change_nothing() -> None:
    machine = Round(goal=2)
    machine.handle(CheckIn("a:1", 1))
    assert of_type(machine.handle(SelectorReported("a:1")), Status) == []  # still selecting
    machine.handle(CheckIn("b:1", 2))
    assert of_type(machine.handle(SelectorReported("x:1")), Status) == []  # not in round
    machine.handle(SelectorReported("a:1"))
    assert of_type(machine.handle(SelectorReported("a:1")), Status) == []  # twice
    assert machine.reported == ["a:1"]


def test_check_ins_during_aggregation_are_held_for_next_round() -> None:
    machine = Round(goal=1)
    machine.handle(CheckIn("a:1", 1))
    machine.handle(SelectorReported("a:1"))
    assert replies(machine.handle(CheckIn("b:1", 2))) == []
    assert of_type(machine.handle(CheckIn("c:1", 3)), Status)[0].held == 2
    effects = machine.handle(AggregationDone(1))
    assert replies(effects) == [(2, True), (3, False)]
    assert of_type(effects, Broadcast) == [Broadcast(2, ("b:1",))]
    assert machine.number == 2 and machine.stage is Stage.CONFIGURATION


def test_stale_aggregation_result_is_ignored() -> None:
    machine = Round(goal=1)
    assert of_type(machine.handle(AggregationDone(1)), Status) == []
    assert machine.number == 1


# -- property-based -----------------------------------------------------------

SELECTORS = [f"10.0.0.{i}:5000" for i in range(4)]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("check_in"), st.sampled_from(SELECTORS)),
        st.tuples(st.just("report"), st.sampled_from(SELECTORS)),
        st.tuples(st.just("aggregated"), st.booleans()),
        st.tuples(st.just("stale"), st.integers(0, 5)),
        st.tuples(st.just("told"), st.sampled_from(SELECTORS)),
    ),
    max_size=150,
)


def to_event(machine: Round, op: tuple, tokens: itertools.count) -> Event:
    match op:
        case ("check_in", selector):
            return CheckIn(selector, reply_to=(next(tokens), selector))
        case ("report", selector):
            return SelectorReported(selector)
        case ("aggregated", ok):
            return AggregationDone(machine.number, error=None if ok else "broken file")
        case ("stale", offset):
            return AggregationDone(machine.number - offset - 1)
        case ("told", selector):
            return BroadcastDone(machine.number, selector)
    raise AssertionError(op)


@settings(max_examples=300, deadline=None)
@given(goal=st.integers(1, 5), ops=operations)
def test_random_event_sequences_keep_the_invariants(goal: int, ops: list[tuple]) -> None:
    machine = Round(goal=goal)
    tokens = itertools.count()
    asked: set[object] = set()
    answered: Counter[object] = Counter()
    finished_rounds = 0
    accepted_total = 0
    finished_accepted = 0
    last: Status = machine.status()

    for op in ops:
        event = to_event(machine, op, tokens)
        if isinstance(event, CheckIn):
            asked.add(event.reply_to)
        effects = machine.handle(event)

        # Never more than the goal accepted in a round; selectors hold exactly those.
        assert 0 <= machine.accepted <= goal
        assert sum(machine.selectors.values()) == machine.accepted
        assert set(machine.reported) <= set(machine.selectors)

        for effect in effects:
            if isinstance(effect, Reply):
                answered[effect.reply_to] += 1
                accepted_total += effect.accepted
            if isinstance(effect, Broadcast):
                # Every selector holding an accepted client is told, once, in its round.
                assert effect.round == machine.number
                assert effect.selectors == tuple(machine.selectors)
                assert sum(machine.selectors.values()) == goal
            if isinstance(effect, Status):
                # Stages only move forward within a round; rounds grow by exactly one.
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

        assert machine.number == 1 + finished_rounds

    # Every check-in is answered exactly once, or still held for the next round.
    held = {c.reply_to for c in machine.held}
    assert all(count == 1 for count in answered.values())
    assert set(answered) | held == asked and not set(answered) & held
    # Accepted answers are exactly the clients counted in the rounds.
    assert accepted_total == finished_accepted + machine.accepted
