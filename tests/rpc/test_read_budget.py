"""The process's budget for unread request bytes: who is shed when it runs out (pure, MockClock)."""

from __future__ import annotations

import logging

import trio
import trio.testing

from fl_coordinator.log_throttle import Throttle
from fl_coordinator.rpc.read_budget import ReadBudget


def test_the_most_stalled_connections_are_shed_first_and_the_newest_last() -> None:
    shed: list[str] = []

    async def main() -> None:
        budget = ReadBudget(10, Throttle(logging.getLogger("test")))
        accounts = {name: budget.open(lambda name=name: shed.append(name)) for name in "abcd"}
        for name in "cab":  # c parks its data first, then a, then b
            accounts[name].add(4, data=True)
            await trio.sleep(1)
        budget.fit(accounts["b"])
        assert (budget.total, shed) == (8, ["c"])  # 12 > 10: c, whose data waited longest

        accounts["d"].add(4, data=True)  # 12 > 10 again: a (stalled longer than b)
        budget.fit(accounts["d"])
        assert shed == ["c", "a"]
        assert budget.total == 8  # b and d
        assert (accounts["c"].held, accounts["a"].held, accounts["c"].open) == (0, 0, False)
        accounts["c"].add(4, data=True)  # a shed connection's late bytes count no more
        assert budget.total == 8

        accounts["d"].add(12, data=True)  # alone over the budget: b first, then d itself
        budget.fit(accounts["d"])
        assert shed == ["c", "a", "b", "d"]
        assert budget.total == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_reading_and_closing_give_bytes_back() -> None:
    async def main() -> None:
        budget = ReadBudget(100, Throttle(logging.getLogger("test")))
        one, two = budget.open(lambda: None), budget.open(lambda: None)
        one.add(60, data=True)
        two.add(30, data=True)
        one.add(-50)  # a call read a message
        assert budget.total == 40
        two.close()
        two.close()  # once only
        assert (budget.total, one.held, two.held) == (10, 10, 0)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
