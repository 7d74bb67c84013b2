"""Prometheus metrics: scraped over real HTTP across a real round, and their derivation."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
import trio
from helpers.http_sink import HttpSink
from helpers.metrics import Samples, parse, scrape
from helpers.peers import FakeSelector, completed, serve_and_watch, write_aggregate
from helpers.processes import environment, run

from fl_coordinator.config import Settings, load_settings
from fl_coordinator.errors import ConfigError, ListenError
from fl_coordinator.status.metrics import Metrics
from fl_coordinator.status.metrics_endpoint import serve_metrics
from fl_coordinator.storage.layout import Layout


def stage(samples: Samples) -> str:
    (name,) = [
        key.split('"')[1]
        for key, value in samples.items()
        if key.startswith("fl_coordinator_stage{") and value == 1
    ]
    return name


async def test_metrics_follow_a_real_round(
    settings: Settings, layout: Layout, keras_weights: list[Path], nursery: trio.Nursery
) -> None:
    sink = HttpSink(statuses=[400])  # the webhook's first message is refused, later ones taken
    await nursery.start(sink.serve)
    settings = settings.replace(checkin_limit=2, metrics_port=0, webhook_url=sink.url)
    endpoints, watcher, client = await serve_and_watch(nursery, settings)
    assert endpoints.metrics_url is not None
    selector = await FakeSelector().start(nursery)

    before = await scrape(endpoints.metrics_url)
    assert before["fl_coordinator_rounds_completed_total"] == 0
    assert before["fl_coordinator_round"] == 1
    assert stage(before) == "SELECTION"
    assert before['fl_coordinator_checkins_total{result="accepted"}'] == 0
    assert before["fl_coordinator_status_subscribers"] == 1  # the watcher
    assert before['fl_coordinator_problem_info{problem_id="DEFAULT"}'] == 1

    assert [await client.check_in(selector.id) for _ in range(3)] == [True, True, False]
    assert await client.check_in("no-port-here") is False  # refused at the RPC edge
    await selector.told.receive()
    await sink.wait_for(1)  # delivered in order: the refused first message was counted
    configuring = await scrape(endpoints.metrics_url)
    assert stage(configuring) == "CONFIGURATION"
    assert configuring["fl_coordinator_round_accepted_clients"] == 2
    assert configuring['fl_coordinator_checkins_total{result="accepted"}'] == 2
    assert configuring['fl_coordinator_checkins_total{result="refused"}'] == 2
    assert configuring["fl_coordinator_webhook_failures_total"] == 1

    write_aggregate(layout, selector.id, keras_weights[0], weight=3)
    await client.report(selector.id)
    done = await watcher.wait_for(completed(1))
    assert done["stage"] == "COMPLETED"
    await watcher.wait_for(lambda m: m["round"] == 2)

    after = await scrape(endpoints.metrics_url)
    assert after["fl_coordinator_rounds_completed_total"] == 1
    assert after["fl_coordinator_rounds_failed_total"] == 0
    assert after["fl_coordinator_round"] == 2
    assert stage(after) == "SELECTION"
    assert after["fl_coordinator_aggregation_seconds_count"] == 1
    assert after["fl_coordinator_aggregation_seconds_sum"] == pytest.approx(
        done["aggregation_seconds"]
    )
    checkpoint_bytes = layout.checkpoint.stat().st_size
    assert 0 < after["fl_coordinator_aggregated_bytes_total"] < 2 * checkpoint_bytes


async def test_only_get_metrics_is_served(settings: Settings, nursery: trio.Nursery) -> None:
    endpoints, _, _ = await serve_and_watch(nursery, settings.replace(metrics_port=0))
    assert endpoints.metrics_url is not None
    base = endpoints.metrics_url.removesuffix("/metrics")
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{base}/other")).status_code == 404
        assert (await client.post(endpoints.metrics_url)).status_code == 405


async def test_metrics_are_off_by_default(settings: Settings, nursery: trio.Nursery) -> None:
    endpoints, _, _ = await serve_and_watch(nursery, settings)
    assert settings.metrics_port is None and endpoints.metrics_url is None


def message(number: int, stage: str, **extra: object) -> dict[str, object]:
    return {"round": number, "stage": stage, "accepted": 0, **extra}


def test_each_round_end_is_counted_once() -> None:
    metrics = Metrics("p")
    for m in [
        message(4, "REPORTING"),  # a restarted coordinator: numbering continues
        message(4, "COMPLETED", aggregation_seconds=0.5),
        message(4, "COMPLETED", aggregation_seconds=0.5),  # e.g. a late report noted
        message(5, "SELECTION"),
        message(5, "FAILED"),
        message(5, "FAILED"),
        message(6, "SELECTION"),
    ]:
        metrics.observe(m)
    samples = parse(metrics.render().decode())
    assert samples["fl_coordinator_rounds_completed_total"] == 1
    assert samples["fl_coordinator_rounds_failed_total"] == 1
    assert samples["fl_coordinator_aggregation_seconds_sum"] == 0.5
    assert samples["fl_coordinator_round"] == 6
    assert Metrics("q").registry is not metrics.registry  # no shared global registry


def test_metrics_port_setting() -> None:
    assert load_settings({}, {})[0].metrics_port is None
    assert load_settings({}, {"METRICS_PORT": ""})[0].metrics_port is None
    assert load_settings({"METRICS_PORT": None}, {})[0].metrics_port is None
    assert load_settings({}, {"METRICS_PORT": "0"})[0].metrics_port == 0
    assert load_settings({"METRICS_PORT": 50053}, {})[0].metrics_port == 50053
    with pytest.raises(ConfigError, match="METRICS_PORT='x'"):
        load_settings({}, {"METRICS_PORT": "x"})


def test_busy_metrics_port_is_one_line(settings: Settings) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = run(["serve"], environment(Path(settings.fl_root_path), METRICS_PORT=str(port)))
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        f"configuration error: METRICS_PORT={port}: "
        "expected a free port (address already in use: is another coordinator running?)"
    )
    assert "Traceback" not in result.stderr


async def test_metrics_at_an_address_not_ours_names_host() -> None:
    """The address is the fault (EADDRNOTAVAIL), not METRICS_PORT: the error names HOST."""
    with pytest.raises(ListenError) as refused:
        await serve_metrics(lambda: b"", "192.0.2.1", 0)
    assert (refused.value.key, str(refused.value)) == ("HOST", (
        "configuration error: HOST='192.0.2.1': expected an address of this machine to listen "
        "at, or 0.0.0.0 for all of them (it is not one: Cannot assign requested address)"
    ))  # fmt: skip
