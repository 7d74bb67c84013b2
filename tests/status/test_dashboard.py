"""The dashboard at ``GET /`` in a real browser (Debian's chromium) against a real coordinator."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from helpers.browser import TrioThread, chromium_page, needs_chromium
from helpers.peers import FakeSelector, PurerpcClient, run_round, watch, write_aggregate

from fl_coordinator.app import Endpoints, serve
from fl_coordinator.config import Settings
from fl_coordinator.storage.journal import Entry, write_journal
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.round_log import round_log_path

pytestmark = [needs_chromium, pytest.mark.browser]

STATUS_TOKEN = "dashboard-secret"

#: Records, in the page, every text the stage shows (a MutationObserver: each change,
#: even one the next message replaces before anyone could look).
_RECORD_STAGES = """
window.stagesShown = [];
document.addEventListener("DOMContentLoaded", () => {
  const stage = document.getElementById("stage");
  new MutationObserver(() => {
    const text = stage.textContent;
    if (window.stagesShown[window.stagesShown.length - 1] !== text) window.stagesShown.push(text);
  }).observe(stage, {childList: true, characterData: true, subtree: true});
});
"""


def page_url(endpoints: Endpoints) -> str:
    return f"http://127.0.0.1:{endpoints.status_port}/"


def test_the_page_follows_a_round_and_keeps_its_history_across_a_restart(
    settings: Settings, layout: Layout, keras_weights: list[Path]
) -> None:
    from playwright.sync_api import expect

    with TrioThread() as loop, chromium_page() as page:
        endpoints, stop = loop.start_cancellable(serve, settings)  # goal: 2 clients
        page.add_init_script(_RECORD_STAGES)
        page.goto(page_url(endpoints))
        expect(page.locator("#connection")).to_have_text("live")
        expect(page.locator("#stage")).to_have_text("SELECTION")
        expect(page.locator("#round")).to_have_text("1")
        expect(page.locator("#clients")).to_have_text("0 / 2")

        client = PurerpcClient(endpoints.grpc_port)
        first = loop.run(FakeSelector().start, loop.nursery)
        second = loop.run(FakeSelector().start, loop.nursery)
        assert loop.run(client.check_in, first.id) is True
        expect(page.locator("#clients")).to_have_text("1 / 2")
        selected = page.locator(f'#selectors tr[data-selector="{first.id}"]')
        expect(selected).to_have_attribute("data-state", "selected")

        assert loop.run(client.check_in, second.id) is True
        expect(page.locator("#stage")).to_have_text("CONFIGURATION")
        loop.run(first.told.receive)
        loop.run(second.told.receive)
        expect(selected).to_have_attribute("data-state", "configured")
        expect(page.locator("#stages li")).to_have_count(2)  # SELECTION took ..., CONFIGURATION

        write_aggregate(layout, first.id, keras_weights[0], weight=3)
        loop.run(client.report, first.id)
        expect(page.locator("#stage")).to_have_text("REPORTING")
        expect(selected).to_have_attribute("data-state", "reported")

        loop.run(client.report, second.id)  # wrote nothing: rejected; the round goes on
        expect(page.locator("#round")).to_have_text("2")
        expect(page.locator("#stage")).to_have_text("SELECTION")
        shown = page.evaluate("window.stagesShown")
        assert shown == ["SELECTION", "CONFIGURATION", "REPORTING", "COMPLETED", "SELECTION"]

        def history_is_right() -> None:
            row = page.locator('#history tr[data-round="1"]')
            expect(row).to_have_attribute("data-outcome", "COMPLETED")
            expect(row.locator("td").nth(2)).to_have_text("2/2")
            expect(row.locator(".bar span")).to_have_count(4)  # four stages, as long as each
            rejected = page.locator(f'#problems li[data-selector="{second.id}"]')
            expect(rejected).to_contain_text(f"round 1: {second.id} rejected: ")
            expect(rejected).to_contain_text(str(layout.agg_weight(second.id)))
            expect(rejected).to_contain_text("is missing")
            expect(page.locator("#history-count")).to_have_text("(1 rounds)")
            expect(page.locator("#aggregation-chart .uplot")).to_have_count(1)

        history_is_right()

        stop()  # the coordinator stops; the page says so, then reconnects by itself
        expect(page.locator("#connection")).to_have_text("reconnecting")
        _, stop = loop.start_cancellable(serve, settings.replace(status_port=endpoints.status_port))
        expect(page.locator("#connection")).to_have_text("live")
        expect(page.locator("#round")).to_have_text("2")
        history_is_right()  # from GET /rounds of the new process
        stop()


def test_the_page_asks_for_the_token(settings: Settings) -> None:
    from playwright.sync_api import expect

    with TrioThread() as loop, chromium_page() as page:
        endpoints, stop = loop.start_cancellable(serve, settings.replace(status_token=STATUS_TOKEN))
        page.goto(page_url(endpoints))
        expect(page.locator("#token-form")).to_be_visible()
        expect(page.locator("#connection")).to_have_text("token needed")
        page.fill("#token", "wrong")
        page.click("#token-form button")
        expect(page.locator("#token-error")).to_have_text("That token was refused.")
        page.fill("#token", STATUS_TOKEN)
        page.click("#token-form button")
        expect(page.locator("#connection")).to_have_text("live")  # the websocket took it too
        expect(page.locator("#stage")).to_have_text("SELECTION")
        expect(page.locator("#token-form")).to_be_hidden()
        stop()


def _record(number: int) -> dict[str, Any]:
    second = number % 60
    stamp = f"2026-11-28T{number // 3600 % 24:02d}:{number // 60 % 60:02d}:{second:02d}"
    return {
        "round": number,
        "outcome": "FAILED" if number % 10 == 0 else "COMPLETED",
        "stages": {
            "SELECTION": stamp + ".000Z",
            "CONFIGURATION": stamp + ".200Z",
            "REPORTING": stamp + ".300Z",
            "AGGREGATING": stamp + ".700Z",
            "COMPLETED": stamp + ".900Z",
        },
        "ended": stamp + ".900Z",
        "accepted": 2,
        "goal": 2,
        "selectors": [{"selector": "10.0.0.5:50051", "fate": "reported"}],
        "aggregation_seconds": 0.2 + number / 10_000,
        "checkpoint_sha256": None,
        **({"error": f"too few reports in round {number}"} if number % 10 == 0 else {}),
    }


def _write_history(layout: Layout, records: list[dict[str, Any]]) -> None:
    """A round log of ``records`` (oldest first), the last of them the journal's round."""
    round_log_path(layout).parent.mkdir(parents=True, exist_ok=True)
    round_log_path(layout).write_text("".join(json.dumps(r) + "\n" for r in records))
    write_journal(layout, Entry(records[-1]["round"], "COMPLETED"))


def test_the_page_draws_a_thousand_rounds(settings: Settings, layout: Layout) -> None:
    from playwright.sync_api import expect

    _write_history(layout, [_record(number) for number in range(1, 1001)])
    with TrioThread() as loop, chromium_page() as page:
        endpoints, stop = loop.start_cancellable(serve, settings)
        page.goto(page_url(endpoints))
        expect(page.locator("#history-count")).to_have_text("(1000 rounds)")
        expect(page.locator("#round")).to_have_text("1001")
        expect(page.locator("#history tbody tr")).to_have_count(50)  # the newest 50
        expect(page.locator("#history tbody tr").first).to_have_attribute("data-round", "1000")
        expect(page.locator("#problems li")).to_have_count(30)  # the newest 30 failures
        expect(page.locator("#problems li").first).to_have_text(
            "round 1000 FAILED: too few reports in round 1000"
        )
        points = page.evaluate(
            "() => document.querySelectorAll('#aggregation-chart .uplot').length"
        )
        assert points == 1
        # The page still answers at once (its main thread is not stuck drawing).
        assert page.evaluate("() => 1 + 1") == 2
        assert re.fullmatch(r"\d+", page.locator("#round").text_content() or "")
        stop()


def test_the_metrics_chart_draws_evaluated_rounds(
    settings: Settings, layout: Layout, keras_weights: list[Path]
) -> None:
    """A real evaluation (EVALUATE in a worker process) of two rounds, in the chart and table."""
    from playwright.sync_api import expect

    evaluating = settings.replace(evaluate="helpers.evaluations:by_round", checkin_limit=1)
    with TrioThread() as loop, chromium_page() as page:
        endpoints, stop = loop.start_cancellable(serve, evaluating)
        page.goto(page_url(endpoints))
        expect(page.locator("#connection")).to_have_text("live")
        watcher = loop.run(watch, loop.nursery, endpoints.status_url)
        for number in (1, 2):
            done = loop.run(
                run_round, loop.nursery, endpoints.grpc_port, watcher, layout,
                [(keras_weights[number], 2)], number,
            )  # fmt: skip
            assert done["stage"] == "COMPLETED"
        expect(page.locator("#metrics-now")).to_contain_text("metrics of round 2: accuracy 0.2000")
        for number, accuracy in ((1, "0.1000"), (2, "0.2000")):
            cell = page.locator(f'#history tr[data-round="{number}"] td.metrics')
            expect(cell).to_contain_text(f"accuracy {accuracy}, weights_mean ")
        chart = page.locator("#metrics-chart .uplot")
        expect(chart).to_have_count(1)
        expect(chart.locator(".u-legend")).to_contain_text("accuracy")
        expect(chart.locator(".u-legend")).to_contain_text("weights_mean")
        expect(page.locator("#metrics-empty")).to_be_hidden()
        stop()


#: Text that runs a script if the page ever puts it in as markup.
_MARKUP = '<img src=x onerror="window.injected=1"><script>window.injected=2</script>'


def test_untrusted_text_is_shown_as_text(settings: Settings, layout: Layout) -> None:
    # Selector ids (host:port: the host part is anything but empty), rejection reasons and
    # errors come from peers and files: the page shows them as text, never as markup.
    from playwright.sync_api import expect

    record = _record(1)
    record["selectors"] = [{"selector": f"{_MARKUP}:1", "fate": "rejected", "reason": _MARKUP}]
    failed = {**_record(2), "outcome": "FAILED", "error": _MARKUP}
    round_log_path(layout).parent.mkdir(parents=True, exist_ok=True)
    round_log_path(layout).write_text(json.dumps(record) + "\n" + json.dumps(failed) + "\n")
    write_journal(layout, Entry(2, "FAILED"))
    with TrioThread() as loop, chromium_page() as page:
        endpoints, stop = loop.start_cancellable(serve, settings)
        page.goto(page_url(endpoints))
        client = PurerpcClient(endpoints.grpc_port)
        live = '<img src=x onerror="window.injected=3">:2'  # an id holds no "/"
        assert loop.run(client.check_in, live) is True
        expect(page.locator("#clients")).to_have_text("1 / 2")
        expect(page.locator("#selectors tbody tr").first).to_contain_text(live)
        expect(page.locator("#problems li")).to_have_count(2)
        expect(page.locator("#problems li").first).to_have_text(f"round 2 FAILED: {_MARKUP}")
        expect(page.locator("#problems li").last).to_contain_text(f"{_MARKUP}:1 rejected: ")
        assert page.evaluate("() => [window.injected, document.images.length]") == [None, 0]
        stop()


def test_the_page_follows_the_pages_of_a_large_history(settings: Settings, layout: Layout) -> None:
    # 30 rounds of 2,000 selectors are about 3 MB of records: GET /rounds answers them in
    # pages of about 1 MB, which the page follows (next_before) to show every round.
    from playwright.sync_api import expect

    many = [
        {"selector": f"10.0.{i // 250}.{i % 250}:50051", "fate": "reported"} for i in range(2000)
    ]
    _write_history(layout, [{**_record(number), "selectors": many} for number in range(1, 31)])
    with TrioThread() as loop, chromium_page() as page:
        endpoints, stop = loop.start_cancellable(serve, settings)
        page.goto(page_url(endpoints))
        expect(page.locator("#history-count")).to_have_text("(30 rounds)")
        expect(page.locator("#history tbody tr").last).to_have_attribute("data-round", "1")
        stop()
