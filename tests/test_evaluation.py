"""Server-side evaluation and the end of a run, on a served coordinator over real sockets.

``EVALUATE`` functions are in ``helpers/evaluations.py``; they run in the
coordinator's evaluation worker process (the test process's fork server
knows the tests' import path).
"""

from __future__ import annotations

import json
import logging
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import REPO
from helpers.evaluations import weights_mean
from helpers.metrics import scrape
from helpers.peers import FakeSelector, PurerpcClient, run_round, serve_and_watch, watch
from helpers.processes import Served, environment, run
from rpc.test_checkin_batch import BatchClient

from fl_coordinator.cli.health import probe
from fl_coordinator.cli.watch import summary
from fl_coordinator.config import Settings
from fl_coordinator.storage.atomic import write_atomic
from fl_coordinator.storage.journal import history, kept_file, read_journal, remember
from fl_coordinator.storage.layout import Layout


def evaluated(number: int):
    return lambda m: m.get("metrics", {}).get("round") == number


def evaluating(settings: Settings, function: str, **more: Any) -> Settings:
    return settings.replace(evaluate=f"helpers.evaluations:{function}", checkin_limit=1, **more)


async def test_metrics_reach_the_status_prometheus_history_journal_and_watch(
    settings: Settings, layout: Layout, keras_weights: list[Path]
) -> None:
    async with trio.open_nursery() as nursery:
        endpoints, watcher, _ = await serve_and_watch(
            nursery, evaluating(settings, "by_round", metrics_port=0)
        )
        # At start-up the checkpoint in place (the initial model's) is evaluated.
        initial = await watcher.wait_for(evaluated(0))
        assert initial["metrics"]["values"]["weights_mean"] == weights_mean(history(layout)[0])
        done = await run_round(nursery, endpoints.grpc_port, watcher, layout,
                               [(keras_weights[0], 2)])  # fmt: skip
        assert done["stage"] == "COMPLETED" and done["metrics"]["round"] == 0
        message = await watcher.wait_for(evaluated(1))
        assert (message["round"], message["stage"]) == (2, "SELECTION")  # round 2 went on
        values = message["metrics"]["values"]
        assert values == {"accuracy": 0.1, "weights_mean": weights_mean(history(layout)[1])}
        samples = await scrape(endpoints.metrics_url)
        assert samples["fl_coordinator_evaluated_round"] == 1
        assert samples["fl_coordinator_evaluation_accuracy"] == 0.1
        assert samples["fl_coordinator_evaluation_weights_mean"] == values["weights_mean"]
        assert "metrics of round 1: accuracy 0.1, weights_mean " in summary(message)
        nursery.cancel_scope.cancel()
    kept = json.loads(kept_file(layout, 1, ".metrics.json").read_text())
    assert kept == {"round": 1, "metrics": values}
    assert read_journal(layout).metrics == {"round": 1, "values": values}
    assert list(layout.tmp.iterdir()) == []  # the evaluations' copies are gone


FAULTS = [
    ("raises", "helpers.evaluations:raises raised ValueError: the test set is missing"),
    ("hangs", "the evaluation did not finish within 20 s (EVALUATE_TIMEOUT)"),
    ("exits", "the evaluation ended its worker process (exit 3)"),
    ("killed", "the evaluation ended its worker process (exit -9)"),
    ("not_a_dict", "it returned list, not a dict of metrics"),
]


@pytest.mark.parametrize(("function", "reason"), FAULTS, ids=[f for f, _ in FAULTS])
async def test_an_evaluation_that_fails_costs_only_that_rounds_metrics(
    settings: Settings,
    layout: Layout,
    keras_weights: list[Path],
    function: str,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        endpoints, watcher, _ = await serve_and_watch(
            nursery, evaluating(settings, function, evaluate_timeout=20.0)
        )
        await watcher.wait_for(evaluated(0))
        for number in (1, 2):  # round 1's evaluation fails; round 2 runs meanwhile
            done = await run_round(nursery, endpoints.grpc_port, watcher, layout,
                                   [(keras_weights[number], 3)], number)  # fmt: skip
            assert done["stage"] == "COMPLETED"
        lines = [r.getMessage() for r in caplog.records]
        if function == "hangs":  # still hanging: round 2 did not wait for it
            assert not any("round 1: no metrics" in line for line in lines)
        second = await watcher.wait_for(evaluated(2))
        assert second["metrics"]["values"]["accuracy"] == 0.2
        assert {m["metrics"]["round"] for m in watcher.messages if "metrics" in m} == {0, 2}
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records]
    assert f"round 1: no metrics ({reason}" in "\n".join(lines)
    assert not kept_file(layout, 1, ".metrics.json").exists()
    assert kept_file(layout, 2, ".metrics.json").exists()
    if function == "not_a_dict":  # round 2's odd metrics are dropped, the rest kept
        assert set(second["metrics"]["values"]) == {"accuracy", "weights_mean"}
        assert any("metric 'bad name': not a metric name" in line for line in lines)
        assert any("metric 'nan': nan is not finite" in line for line in lines)


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


async def test_keras_and_jax_never_load_into_the_coordinator_process(layout: Layout) -> None:
    env = environment(layout.root, EVALUATE="helpers.evaluations:where", CHECKIN_LIMIT="1",
                      PYTHONPATH=str(REPO / "tests"))  # fmt: skip
    with Served(env) as served:
        line = served.wait_for_line("status stream at")
        url = re.search(r"status stream at (\S+),", line).group(1)
        async with trio.open_nursery() as nursery:
            watcher = await watch(nursery, url)
            values = (await watcher.wait_for(evaluated(0)))["metrics"]["values"]
            nursery.cancel_scope.cancel()
        worker, coordinator = int(values["pid"]), served.process.pid
        assert values["keras_loaded"] == 1 and worker != coordinator
        assert coordinator in _ancestors(worker)  # its worker (through the fork server)
        assert "jaxlib" in _maps(worker)  # what Keras on JAX maps, where it runs...
        assert "jaxlib" not in _maps(coordinator)  # ...and not in the coordinator
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=60) == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("helpers.evaluations:missing", "AttributeError: module 'helpers.evaluations' has no"),
        ("no_such_module:f", "ModuleNotFoundError: No module named 'no_such_module'"),
    ],
)
def test_an_evaluate_that_cannot_be_imported_stops_serve(
    layout: Layout, value: str, expected: str
) -> None:
    env = environment(layout.root, EVALUATE=value, PYTHONPATH=str(REPO / "tests"))
    result = run(["serve"], env)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"fl-coordinator serve: configuration error: EVALUATE={value!r}: "
                           "expected a function the worker process can import (")  # fmt: skip
    assert expected in line


def test_evaluate_and_stop_when_are_checked_with_the_settings(layout: Layout) -> None:
    result = run(["serve"], environment(layout.root, EVALUATE="not a function"))
    assert "EVALUATE='not a function': expected package.module:function" in result.stderr
    result = run(["serve"], environment(layout.root, STOP_WHEN="accuracy>=0.9"))
    assert "STOP_WHEN='accuracy>=0.9': expected empty, or EVALUATE set too" in result.stderr
    result = run(["serve"], environment(layout.root, STOP_WHEN="accuracy=0.9", EVALUATE="a:b"))
    assert "STOP_WHEN='accuracy=0.9': expected a condition such as" in result.stderr


async def refused_everywhere(port: int, selector: FakeSelector) -> None:
    """A check-in is refused by both RPCs (the old one and the batched one)."""
    assert await PurerpcClient(port).check_in(selector.id) is False
    batch = BatchClient(port)
    try:
        assert await batch.ask(selector.id, 5) == 0
    finally:
        batch.close()


async def test_rounds_end_the_run_and_a_restart_stays_finished(
    settings: Settings, layout: Layout, keras_weights: list[Path]
) -> None:
    settings = settings.replace(checkin_limit=1, rounds=2, metrics_port=0)
    async with trio.open_nursery() as nursery:
        endpoints, watcher, _ = await serve_and_watch(nursery, settings)
        for number in (1, 2):
            await run_round(nursery, endpoints.grpc_port, watcher, layout,
                            [(keras_weights[number], 2)], number)  # fmt: skip
        finished = await watcher.wait_for(lambda m: m["stage"] == "FINISHED")
        assert finished["round"] == 2
        assert finished["finished"] == (
            "round 2 was the last (ROUNDS=2); to go on, raise ROUNDS and restart"
        )
        selector = await FakeSelector().start(nursery)
        await refused_everywhere(endpoints.grpc_port, selector)
        health = await trio.to_thread.run_sync(probe, f"127.0.0.1:{endpoints.grpc_port}")
        assert health.serving  # it keeps serving status, health and metrics
        samples = await scrape(endpoints.metrics_url)
        assert samples['fl_coordinator_stage{fl_coordinator_stage="FINISHED"}'] == 1
        assert samples["fl_coordinator_rounds_completed_total"] == 2
        nursery.cancel_scope.cancel()
    assert (read_journal(layout).round, read_journal(layout).stage) == (2, "FINISHED")
    checkpoint = layout.checkpoint.read_bytes()

    async with trio.open_nursery() as nursery:  # the same settings: still finished
        endpoints, watcher, _ = await serve_and_watch(nursery, settings)
        first = await watcher.wait_for(lambda m: True)
        assert (first["round"], first["stage"]) == (2, "FINISHED")
        assert "raise ROUNDS" in first["finished"]
        await refused_everywhere(endpoints.grpc_port, await FakeSelector().start(nursery))
        nursery.cancel_scope.cancel()
    assert layout.checkpoint.read_bytes() == checkpoint

    async with trio.open_nursery() as nursery:  # ROUNDS raised: the run goes on
        endpoints, watcher, _ = await serve_and_watch(nursery, settings.replace(rounds=3))
        first = await watcher.wait_for(lambda m: True)
        assert (first["round"], first["stage"]) == (3, "SELECTION")
        done = await run_round(nursery, endpoints.grpc_port, watcher, layout,
                               [(keras_weights[3], 2)], 3)  # fmt: skip
        assert done["stage"] == "COMPLETED"
        assert (await watcher.wait_for(lambda m: m["stage"] == "FINISHED"))["round"] == 3
        nursery.cancel_scope.cancel()


async def test_stop_when_ends_the_run_on_an_evaluated_metric(
    settings: Settings, layout: Layout, keras_weights: list[Path]
) -> None:
    settings = evaluating(settings, "by_round", stop_when="accuracy>=0.2")
    async with trio.open_nursery() as nursery:
        endpoints, watcher, _ = await serve_and_watch(nursery, settings)
        for number in (1, 2):  # accuracy 0.1, then 0.2
            await run_round(nursery, endpoints.grpc_port, watcher, layout,
                            [(keras_weights[number], 2)], number)  # fmt: skip
        finished = await watcher.wait_for(lambda m: m["stage"] == "FINISHED")
        assert finished["round"] == 3  # round 3 was selecting: it ends at once
        assert finished["metrics"] == {"round": 2, "values": {
            "accuracy": 0.2, "weights_mean": weights_mean(history(layout)[2])}}  # fmt: skip
        assert finished["finished"] == (
            "round 2's accuracy=0.2 meets STOP_WHEN accuracy>=0.2; to go on, change STOP_WHEN "
            "and restart"
        )
        await refused_everywhere(endpoints.grpc_port, await FakeSelector().start(nursery))
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        endpoints, watcher, _ = await serve_and_watch(nursery, settings)
        first = await watcher.wait_for(lambda m: True)
        assert (first["round"], first["stage"]) == (3, "FINISHED")
        assert first["metrics"]["round"] == 2
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        changed = settings.replace(stop_when="accuracy>=0.5")
        endpoints, watcher, _ = await serve_and_watch(nursery, changed)
        first = await watcher.wait_for(lambda m: True)
        assert (first["round"], first["stage"]) == (4, "SELECTION")
        nursery.cancel_scope.cancel()


def test_rollback_lists_the_metrics_of_each_kept_round(layout: Layout) -> None:
    """What ``rollback`` shows next to each round (to choose one to go back to)."""
    remember(layout, 0, 5)
    remember(layout, 1, 5)
    text = json.dumps({"round": 1, "metrics": {"accuracy": 0.5}})
    write_atomic(kept_file(layout, 1, ".metrics.json"), text.encode(), layout.tmp)
    result = run(["rollback"], environment(layout.root))
    assert result.returncode == 0
    assert f"  1: {kept_file(layout, 1)}  (accuracy 0.5)" in result.stdout
    assert f"  0: {kept_file(layout, 0)}\n" in result.stdout
