"""Plain HTTP on the status port: ``GET /status`` and the round history ``GET /rounds``."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from helpers.peers import FakeSelector, answer_to, completed, serve_and_watch, write_aggregate

from fl_coordinator.app import serve
from fl_coordinator.config import Settings
from fl_coordinator.status.pages import MAX_PAGE_BYTES
from fl_coordinator.storage.journal import history
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.round_log import round_log_path

STATUS_TOKEN = "dashboard-secret"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_url(status_url: str) -> str:
    return status_url.replace("ws://", "http://").removesuffix("/status")


async def get(url: str, token: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient() as client:
        return await client.get(url, headers=headers)


async def a_round(
    nursery: trio.Nursery, settings: Settings, layout: Layout, number: int, good: list[Path]
) -> tuple[dict[str, Any], list[str]]:
    """Round ``number`` of two selectors at a new coordinator; those with no file in ``good``
    write nothing. Its last status message, and the selectors in order."""
    _, watcher, client = await serve_and_watch(nursery, settings)
    selectors = [await FakeSelector().start(nursery) for _ in range(2)]
    for selector in selectors:
        assert await client.check_in(selector.id) is True
    for index, selector in enumerate(selectors):
        await selector.told.receive()
        if index < len(good):
            write_aggregate(layout, selector.id, good[index], weight=index + 1)
        await client.report(selector.id)
    return await watcher.wait_for(completed(number)), [s.id for s in selectors]


def seconds(time: str) -> float:
    return datetime.fromisoformat(time).timestamp()


async def test_round_history_survives_a_restart_and_matches_the_files(
    settings: Settings, layout: Layout, keras_weights
) -> None:
    async with trio.open_nursery() as nursery:  # round 1: both report
        done, first_ids = await a_round(nursery, settings, layout, 1, keras_weights[:2])
        assert done["stage"] == "COMPLETED"
        nursery.cancel_scope.cancel()
    first_digest = digest(layout.checkpoint)
    strict = settings.replace(min_reporting_fraction=1.0)
    async with trio.open_nursery() as nursery:  # round 2, after a restart: one writes nothing
        failed, second_ids = await a_round(nursery, strict, layout, 2, keras_weights[:1])
        assert failed["stage"] == "FAILED"
        nursery.cancel_scope.cancel()
    assert digest(layout.checkpoint) == first_digest  # a failed round keeps the checkpoint

    async with trio.open_nursery() as nursery:  # a third one serves the history (round 3 opened)
        endpoints = await nursery.start(serve, settings)
        url = base_url(endpoints.status_url)
        rounds = (await get(f"{url}/rounds")).json()
        status = (await get(f"{url}/status")).json()
        older = (await get(f"{url}/rounds?before=2&limit=1")).json()
        newest = (await get(f"{url}/rounds?limit=1")).json()
        bad = await get(f"{url}/rounds?limit=0")
        nursery.cancel_scope.cancel()

    assert rounds["problem_id"] == settings.problem_id
    assert [r["round"] for r in rounds["rounds"]] == [2, 1]  # newest first
    second, first = rounds["rounds"]
    assert (first["outcome"], first["accepted"], first["goal"]) == ("COMPLETED", 2, 2)
    assert first["checkpoint_sha256"] == first_digest == digest(history(layout)[1])
    assert first["selectors"] == [{"selector": s, "fate": "reported"} for s in first_ids]
    assert 0 < first["aggregation_seconds"] < 60
    assert list(first["stages"]) == [
        "SELECTION", "CONFIGURATION", "REPORTING", "AGGREGATING", "COMPLETED"
    ]  # fmt: skip
    times = [seconds(t) for t in first["stages"].values()]
    assert times == sorted(times) and first["ended"] == first["stages"]["COMPLETED"]
    assert "error" not in first

    assert (second["outcome"], second["checkpoint_sha256"]) == ("FAILED", None)
    assert "only 1 of 2 client(s) reported usable updates" in second["error"]
    assert second["selectors"][0] == {"selector": second_ids[0], "fate": "reported"}
    rejected = second["selectors"][1]
    assert (rejected["selector"], rejected["fate"]) == (second_ids[1], "rejected")
    assert str(layout.agg_weight(second_ids[1])) in rejected["reason"]
    assert second["aggregation_seconds"] is None

    assert [r["round"] for r in newest["rounds"]] == [2] and newest["next_before"] == 2
    assert older["rounds"] == [first] and older["next_before"] is None
    assert bad.status_code == 400 and "limit must be a whole number >= 1" in bad.text

    # The file holds what was served, one line per round, oldest first.
    lines = round_log_path(layout).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [first, second]

    assert (status["round"], status["stage"], status["accepted"]) == (3, "SELECTION", 0)
    assert status["stage_started"] == status["stages"]["SELECTION"]


async def test_plain_requests_follow_the_status_token(
    settings: Settings, nursery: trio.Nursery
) -> None:
    endpoints = await nursery.start(serve, settings.replace(status_token=STATUS_TOKEN))
    url = base_url(endpoints.status_url)
    for path in ("/status", "/rounds"):
        refused = await get(url + path)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"] == "Bearer"
        assert (await get(url + path, "wrong")).status_code == 401
        assert (await get(url + path, STATUS_TOKEN)).status_code == 200
    assert (await get(url + "/status", STATUS_TOKEN)).json()["round"] == 1
    page = await get(url + "/")  # the page holds no data: it asks for the token
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert b'<script src="static/dashboard.js">' in page.content
    chart = await get(url + "/static/uPlot.iife.min.js")
    assert chart.headers["content-type"].startswith("text/javascript")
    assert len(chart.content) > 10_000
    assert (await get(url + "/static/../pages.py")).status_code == 404
    assert (await get(url + "/elsewhere")).status_code == 404
    async with httpx.AsyncClient() as client:
        posted = await client.post(url + "/status", content=b"{}")
    assert posted.status_code == 405


async def test_hostile_requests_end_their_connection_only(
    settings: Settings, nursery: trio.Nursery
) -> None:
    endpoints = await nursery.start(serve, settings)
    port = endpoints.status_port
    huge = b"GET /status HTTP/1.1\r\nhost: x\r\nx-filler: " + b"a" * 20_000 + b"\r\n\r\n"
    too_large = await answer_to(port, huge)  # over 16 KB of head: told so, closed, nothing read
    assert too_large.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    not_http = await answer_to(port, b"\x16\x03\x01\x00\xff" + bytes(range(256)))  # TLS hello
    assert not_http.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    no_host = await answer_to(port, b"GET /status HTTP/1.1\r\n\r\n")  # not HTTP/1.1
    assert no_host.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"content-length: 0" in no_host
    for bad_limit in (b"0", b"-1", b"1001"):
        refused = await answer_to(
            port, b"GET /rounds?limit=%s HTTP/1.1\r\nhost: x\r\n\r\n" % bad_limit
        )
        assert refused.startswith(b"HTTP/1.1 400 ") and b"limit must be" in refused
    assert b">= 1, not '0'" in await answer_to(
        port, b"GET /rounds?limit=0 HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    answer = await answer_to(port, b"GET /rounds?limit=2&before=-1 HTTP/1.1\r\nhost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"before must be a whole number" in answer
    ok = await answer_to(port, b"GET /status HTTP/1.1\r\nhost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 ") and b'"stage": "SELECTION"' in ok


async def test_a_browser_sends_the_token_as_a_subprotocol(
    settings: Settings, nursery: trio.Nursery
) -> None:
    """A browser's WebSocket cannot set headers: ``bearer.<base64url>`` stands for one."""
    endpoints = await nursery.start(serve, settings.replace(status_token=STATUS_TOKEN))
    encoded = base64.urlsafe_b64encode(STATUS_TOKEN.encode()).decode().rstrip("=")
    async with trio_websocket.open_websocket_url(
        endpoints.status_url, subprotocols=["fl-status", f"bearer.{encoded}"]
    ) as ws:
        assert ws.subprotocol == "fl-status"
        assert json.loads(await ws.get_message())["stage"] == "SELECTION"
    wrong = base64.urlsafe_b64encode(b"wrong").decode()
    for protocols in (["fl-status", f"bearer.{wrong}"], ["fl-status", "bearer.%%%"], ["fl-status"]):
        with pytest.raises(trio_websocket.ConnectionRejected) as refused:
            async with trio_websocket.open_websocket_url(
                endpoints.status_url, subprotocols=protocols
            ):
                pass
        assert refused.value.status_code == 401, protocols


async def test_head_requests_are_answered_as_gets_without_a_body(
    settings: Settings, nursery: trio.Nursery
) -> None:
    # A HEAD (curl -I, a load balancer's check) once went unanswered: h11 refuses a HEAD
    # response's body, and the handler failed with a traceback.
    endpoints = await nursery.start(serve, settings.replace(metrics_port=0))
    assert endpoints.metrics_port is not None
    for port, path in (
        (endpoints.status_port, b"/"),
        (endpoints.status_port, b"/rounds"),
        (endpoints.metrics_port, b"/metrics"),
    ):
        got = await answer_to(port, b"GET " + path + b" HTTP/1.1\r\nhost: x\r\n\r\n")
        head, body = got.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 ") and len(body) > 0, path
        headed = await answer_to(port, b"HEAD " + path + b" HTTP/1.1\r\nhost: x\r\n\r\n")
        assert headed.startswith(b"HTTP/1.1 200 ") and headed.endswith(b"\r\n\r\n"), path
        # The page is fixed; the data may change between the two requests (a round ends).
        length = f"{len(body)}\r\n".encode() if path == b"/" else b""
        assert b"\r\ncontent-length: " + length in headed.lower(), path


def _big_record(number: int, selectors: int) -> dict[str, Any]:
    """The record of a round of ``selectors`` selectors that all reported (~50 B each)."""
    return {
        "round": number,
        "outcome": "COMPLETED",
        "stages": {"SELECTION": "2026-11-28T00:00:00.000Z"},
        "ended": "2026-11-28T00:00:02.000Z",
        "accepted": selectors,
        "goal": selectors,
        "selectors": [
            {"selector": f"10.0.{i // 250}.{i % 250}:50051", "fate": "reported"}
            for i in range(selectors)
        ],
        "aggregation_seconds": 1.0,
        "checkpoint_sha256": None,
    }


async def test_a_page_of_rounds_is_bounded_in_bytes_and_the_pages_hold_every_round(
    settings: Settings, layout: Layout, nursery: trio.Nursery
) -> None:
    # A record lists every selector of its round: 1,000 records of 2,000 selectors were a
    # 107 MB answer, built on the event loop (3.8 s) for anyone who asked for ?limit=1000.
    lines = [json.dumps(_big_record(number, 2000)) for number in range(1, 31)]
    round_log_path(layout).parent.mkdir(parents=True, exist_ok=True)
    round_log_path(layout).write_text("\n".join(lines) + "\n")
    endpoints = await nursery.start(serve, settings)
    url = base_url(endpoints.status_url) + "/rounds?limit=1000"
    seen: list[int] = []
    sizes: list[int] = []
    while True:
        answer = await get(url)
        page = answer.json()
        sizes.append(len(answer.content))
        seen += [record["round"] for record in page["rounds"]]
        if page["next_before"] is None:
            break
        assert page["next_before"] == seen[-1]
        url = base_url(endpoints.status_url) + f"/rounds?limit=1000&before={seen[-1]}"
    assert seen == list(range(30, 0, -1))  # every round once, newest first
    record_bytes = len(lines[0])  # about 100 KB
    assert max(sizes) <= MAX_PAGE_BYTES + 200 and len(sizes) >= 30 * record_bytes // MAX_PAGE_BYTES
