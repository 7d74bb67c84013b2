"""The reference selector names the coordinator's rounds (issue 13, items 2, 3 and 10).

The real ``fl-coordinator serve`` and ``fl-selector serve`` run as
subprocesses; the clients are the reference client's calls (check-in,
download, upload of a real Keras-written update) in the test's process, and
the rounds are followed on the real status stream.

* Clients let go after the selector's hold timeout are given back
  (``ReleaseClients``): with ``CHECKIN_LIMIT=6``, three clients that are let go
  and check in again are counted three times, not six, and the goal is reached
  only when three more come.
* A report of a round a restart abandoned names that round
  (``ReportAggregate``): it is refused, the selector logs it, and the next
  round's real report is taken.
"""

from __future__ import annotations

import re
import signal
import socket
import sys
from pathlib import Path

import trio
from helpers.peers import assert_arrays_close, completed, fedavg, read_floats, watch
from helpers.processes import Served, environment

from fl_coordinator.config import Settings
from fl_coordinator.federation.client import SelectorCalls
from fl_coordinator.storage.layout import Layout

SELECTOR = [sys.executable, "-m", "fl_coordinator.federation.selector_cli", "serve"]


def start_selector(coordinator: str, root: Path, *flags: str) -> tuple[Served, str]:
    served = Served(environment(root), [*SELECTOR, "--coordinator", coordinator,
                                        "--root", str(root), "--port", "0", *flags])  # fmt: skip
    line = served.wait_for_line("serving")
    return served, line.split("selector ", 1)[1].split(" serving", 1)[0]


async def line_of(served: Served, text: str) -> str:
    return await trio.to_thread.run_sync(served.wait_for_line, text)


async def released(selector: Served, clients: int) -> list[str]:
    """The selector's lines about giving clients back, once they add up to ``clients``."""

    def lines() -> list[str]:
        return [line for line in selector.lines if "held client(s) let go" in line]

    while sum(int(line.split("no longer counts ")[1].split()[0]) for line in lines()) < clients:
        await line_of(selector, "held client(s) let go")
    return lines()


async def let_go_twice(calls: SelectorCalls) -> list[int | None]:
    """Check in until let go (the hold timeout), then once more: the two answers."""
    async with trio.open_nursery() as nursery:
        calls.connect(nursery)
        answers = [await calls.check_in(), await calls.check_in()]
        nursery.cancel_scope.cancel()
    return answers


async def configured(calls: SelectorCalls, got: list[str]) -> None:
    async with trio.open_nursery() as nursery:
        calls.connect(nursery)
        assert await calls.check_in() is None  # accepted, then sent initFiles/
        got.append(calls.selector)
        nursery.cancel_scope.cancel()


async def test_clients_let_go_and_back_are_counted_once(
    settings: Settings, layout: Layout, tmp_path: Path, nursery: trio.Nursery
) -> None:
    env = environment(layout.root, CHECKIN_LIMIT="6")
    with Served(env) as coordinator:
        grpc_port, status_url = coordinator.ready()
        watcher = await watch(nursery, status_url)
        selector, selector_id = start_selector(
            f"127.0.0.1:{grpc_port}", layout.root, "--hold-timeout", "3", "--waiting-time-ms", "50"
        )
        with selector, trio.fail_after(120):
            clients = [SelectorCalls(selector_id, tmp_path / f"c{k}") for k in range(3)]
            answers: list[list[int | None]] = []

            async def one(calls: SelectorCalls) -> None:
                answers.append(await let_go_twice(calls))

            async with trio.open_nursery() as three:
                for calls in clients:
                    three.start_soon(one, calls)
            assert answers == [[50, 50]] * 3  # each let go twice, told to come back in 50 ms
            lines = await released(selector, 6)  # each given back before it was let go
            assert all("round 1: " in line for line in lines)  # the coordinator's number
            phase_1 = list(watcher.messages)
            assert {(m["round"], m["stage"]) for m in phase_1} == {(1, "SELECTION")}
            assert max(m["accepted"] for m in phase_1) <= 3  # never one client twice

            # Now six different clients at once: the goal, each counted once.
            got: list[str] = []
            async with trio.open_nursery() as six:
                for k in range(6):
                    six.start_soon(configured, SelectorCalls(selector_id, tmp_path / f"n{k}"), got)
            assert len(got) == 6
            goal = await watcher.wait_for(lambda m: m["stage"] == "CONFIGURATION")
            assert (goal["round"], goal["accepted"], goal["selectors"]) == (1, 6, [selector_id])
            told = re.search(
                r"round 1: goal reached; sending files to (\d+) client\(s\) \((\d+) more",
                await line_of(selector, "goal reached"),
            )  # (GoalCountReached may overtake the answer to the last batch)
            assert told and int(told.group(1)) + int(told.group(2)) == 6
            selector.process.send_signal(signal.SIGTERM)
            assert selector.process.wait(timeout=60) == 0


async def test_a_report_of_an_abandoned_round_is_refused_and_the_next_one_taken(
    settings: Settings, layout: Layout, keras_weights: list[Path], tmp_path: Path
) -> None:
    with socket.socket() as probe:  # the coordinator comes back on the same port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = environment(layout.root, CHECKIN_LIMIT="1", PORT=str(port))
    before = read_floats(layout.checkpoint)
    with trio.fail_after(180), Served(env) as first:
        async with trio.open_nursery() as nursery:
            _, status_url = first.ready()
            watcher = await watch(nursery, status_url)
            selector, selector_id = start_selector(f"127.0.0.1:{port}", layout.root)
            old = SelectorCalls(selector_id, tmp_path / "old")
            old.connect(nursery)
            assert await old.check_in() is None  # round 1 reached its goal: configured
            await watcher.wait_for(lambda m: (m["round"], m["stage"]) == (1, "CONFIGURATION"))
            # (labelled "cohort 1" if GoalCountReached overtook the answer naming round 1)
            await line_of(selector, "goal reached")

            first.process.send_signal(signal.SIGTERM)  # Ctrl-C in CONFIGURATION
            assert first.process.wait(timeout=60) == 0
            with selector, Served(env) as second:
                _, status_url = second.ready()
                watcher = await watch(nursery, status_url)
                await watcher.wait_for(lambda m: (m["round"], m["stage"]) == (2, "SELECTION"))

                # The old client's update arrives now: its selector reports round 1.
                await old.upload(keras_weights[0], 3)
                refused = await line_of(selector, "refused the report")
                assert "round 1: the coordinator refused the report" in refused
                ignored = await watcher.wait_for(lambda m: bool(m["ignored"]))
                assert ignored["ignored"] == [[selector_id, "it is for round 1, not this one"]]
                assert (ignored["round"], ignored["stage"], ignored["accepted"]) == (
                    2, "SELECTION", 0,
                )  # fmt: skip

                # Round 2, with its own client: its report is taken, its update averaged.
                new = SelectorCalls(selector_id, tmp_path / "new")
                new.connect(nursery)
                assert await new.check_in() is None
                await new.upload(keras_weights[1], 5)
                done = await watcher.wait_for(completed(2))
                assert done["stage"] == "COMPLETED" and done["reported"] == [selector_id]
                taken = await line_of(selector, "round 2: reported to the coordinator")
                assert "WARNING" not in taken
                selector.process.send_signal(signal.SIGTERM)
                assert selector.process.wait(timeout=60) == 0
                second.process.send_signal(signal.SIGTERM)
                assert second.process.wait(timeout=60) == 0
            nursery.cancel_scope.cancel()
    # Only round 2's update moved the model (round 1 was abandoned: nothing averaged).
    assert_arrays_close(read_floats(layout.checkpoint), fedavg(before, [(keras_weights[1], 5)]))
