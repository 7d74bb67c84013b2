"""``fl-coordinator watch``: a real process following a real coordinator, and its views."""

from __future__ import annotations

import io
import json
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers.peers import FakeSelector, completed, serve_and_watch, write_aggregate
from helpers.pki import Pki, tls_settings
from helpers.processes import COMMAND, Served, environment, run
from rich.console import Console
from rich.live import Live
from trio_websocket import WebSocketRequest, serve_websocket

from fl_coordinator.app import serve
from fl_coordinator.cli import watch as watch_module
from fl_coordinator.cli.watch import LiveView, PlainView, durations, follow, summary
from fl_coordinator.config import Settings
from fl_coordinator.errors import WatchError
from fl_coordinator.status.schema import StatusMessage
from fl_coordinator.storage.layout import Layout


class Lines:
    """Lines of a process's output stream, read as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.seen: list[str] = []

    async def until(self, text: str) -> str:
        while True:
            while b"\n" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\n", 1)
                self.seen.append(raw.decode())
                if text in self.seen[-1]:
                    return self.seen[-1]
            chunk = await self._stream.receive_some()
            if not chunk:
                raise AssertionError(f"output ended without {text!r}: {self.seen}")
            self._buffer += chunk


async def test_watch_prints_each_stage_then_stops_on_ctrl_c(
    settings: Settings, layout: Layout, keras_weights: list[Path], nursery: trio.Nursery
) -> None:
    endpoints, watcher, client = await serve_and_watch(nursery, settings.replace(checkin_limit=1))
    selector = await FakeSelector().start(nursery)
    env = environment(layout.root)
    process = await trio.lowlevel.open_process(
        [*COMMAND, "watch", endpoints.status_url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        out = Lines(process.stdout)
        first = await out.until("round 1")  # the current status, sent on connecting
        assert "SELECTION" in first and "clients 0/1" in first

        assert await client.check_in(selector.id) is True
        await selector.told.receive()
        write_aggregate(layout, selector.id, keras_weights[0], weight=1)
        await client.report(selector.id)
        await watcher.wait_for(completed(1))
        done = await out.until("COMPLETED")
        assert "round 1" in done and "reported 1" in done and "aggregated in" in done
        took = done.split("took ", 1)[1].split(", ")  # each stage with its duration
        assert [part.split()[0] for part in took] == [
            "SELECTION", "CONFIGURATION", "REPORTING", "AGGREGATING"
        ]  # fmt: skip
        assert all(float(part.split()[1]) >= 0 for part in took)
        await out.until("round 2")

        process.send_signal(signal.SIGINT)
        assert await process.wait() == 0
        assert await process.stderr.receive_some() == b""  # no traceback, no log line
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stages = [line.split()[3] for line in out.seen]
    assert stages[0] == "SELECTION" and "CONFIGURATION" in stages and "REPORTING" in stages
    assert stages[-2:] == ["COMPLETED", "SELECTION"]
    assert all(line.split()[0].endswith("Z") for line in out.seen)  # each with its time


def test_unreachable_coordinator_is_one_line_and_status_1(tmp_path: Path) -> None:
    result = run(["watch", "ws://127.0.0.1:1/status"], environment(tmp_path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "fl-coordinator watch: cannot connect to ws://127.0.0.1:1/status: "
        "Error connecting to ('127.0.0.1', 1): Connection refused"
    ]


class Collected:
    def __init__(self) -> None:
        self.messages: list[StatusMessage] = []

    def connected(self) -> None:
        pass

    def show(self, message: StatusMessage) -> None:
        self.messages.append(message)


async def test_token_is_sent_and_a_closed_stream_is_an_error(nursery: trio.Nursery) -> None:
    headers: list[dict[bytes, bytes]] = []

    async def handler(request: WebSocketRequest) -> None:
        headers.append(dict(request.headers))
        ws = await request.accept()
        await ws.send_message(json.dumps(message(1, "SELECTION")))
        await ws.aclose()

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    url = f"ws://127.0.0.1:{server.port}/status"
    shown = Collected()
    with pytest.raises(WatchError, match="closed the status stream"):
        await follow(url, shown, token="s3cret")
    assert headers[0][b"authorization"] == b"Bearer s3cret"
    assert [m["stage"] for m in shown.messages] == ["SELECTION"]

    with pytest.raises(WatchError):
        await follow(url, shown)
    assert b"authorization" not in headers[1]


def message(number: int, stage: str, **extra: Any) -> StatusMessage:
    base = {
        "problem_id": "P",
        "time": "2026-11-28T00:00:00.000Z",
        "round": number,
        "stage": stage,
        "accepted": 2,
        "goal": 3,
        "selectors": ["a:1", "b:2"],
        "configured": [],
        "reported": [],
        "unreachable": [],
        "rejected": {},
        "ignored": [],
        "aggregating": False,
        "held": 0,
    }
    return {**base, **extra}


def test_summary_and_plain_lines() -> None:
    assert summary(message(3, "SELECTION")) == (
        "round 3  SELECTION      clients 2/3  selectors 2  configured 0  reported 0"
    )
    failed = summary(message(3, "FAILED", rejected={"a:1": "bad"}, error="too few"))
    assert failed.endswith("rejected 1  error: too few")

    out = io.StringIO()
    view = PlainView(out)
    view.show(message(1, "SELECTION"))
    view.show(message(1, "SELECTION", ignored=[["x", "stranger"]]))  # same summary: no line
    view.show(message(1, "COMPLETED", aggregation_seconds=0.25))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[1] == "2026-11-28T00:00:00.000Z  round 1  COMPLETED      clients 2/3  " + (
        "selectors 2  configured 0  reported 0  aggregated in 0.250 s"
    )


def test_stage_durations_and_metrics() -> None:
    stages = {
        "SELECTION": "2026-11-28T00:00:00.000Z",
        "CONFIGURATION": "2026-11-28T00:00:01.500Z",
        "REPORTING": "2026-11-28T00:00:01.750Z",
    }
    reporting = message(1, "REPORTING", stages=stages)
    assert durations(reporting) == [
        ("SELECTION", 1.5),
        ("CONFIGURATION", 0.25),
        ("REPORTING", None),
    ]
    assert summary(reporting).endswith("took SELECTION 1.50 s, CONFIGURATION 0.25 s")
    done = {**stages, "AGGREGATING": "2026-11-28T00:00:02.000Z",
            "COMPLETED": "2026-11-28T00:00:02.125Z"}  # fmt: skip
    assert durations(message(1, "COMPLETED", stages=done))[2:] == [
        ("REPORTING", 0.25), ("AGGREGATING", 0.125)
    ]  # fmt: skip
    evaluated = message(2, "SELECTION", metrics={"round": 1, "values": {"loss": 0.3125}})
    assert summary(evaluated).endswith("metrics of round 1: loss 0.3125")  # issue 14's


def test_live_view_draws_the_round() -> None:
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    with Live(console=console, auto_refresh=False) as live:
        view = LiveView(live)
        stages = {"SELECTION": "2026-11-28T00:00:00.000Z", "REPORTING": "2026-11-28T00:00:02.500Z"}
        view.show(
            message(2, "REPORTING", reported=["a:1"], rejected={"b:2": "[bold]x[/]"}, stages=stages)
        )
    text = out.getvalue()
    assert "P  round 2" in text and "REPORTING" in text
    assert "b:2: [bold]x[/]" in text  # shown as sent, not taken for markup
    assert "round 2  REPORTING" in text
    assert re.search(r"selection +took 2\.50 s", text) and re.search(r"reporting +under way", text)


class Recorder:
    """A view that keeps what it is shown and says when something arrived."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.arrived = trio.Event()

    def connected(self) -> None:
        pass

    def show(self, message: dict) -> None:
        self.messages.append(message)
        self.arrived.set()


async def test_watch_follows_a_tls_coordinator_with_its_ca(
    settings: Settings, pki: Pki, nursery: trio.Nursery
) -> None:
    endpoints = await nursery.start(serve, tls_settings(settings, pki))
    assert endpoints.status_url.startswith("wss://")
    recorder = Recorder()
    async with trio.open_nursery() as watching:
        watching.start_soon(follow, endpoints.status_url, recorder, None, pki.ca)
        await recorder.arrived.wait()
        watching.cancel_scope.cancel()
    assert (recorder.messages[0]["round"], recorder.messages[0]["stage"]) == (1, "SELECTION")
    with pytest.raises(WatchError, match="not a readable PEM CA bundle"):
        await follow(endpoints.status_url, Recorder(), ca=pki.ca.parent / "missing.pem")


async def test_watch_with_ws_at_a_tls_coordinator_says_to_use_wss(
    settings: Settings, pki: Pki, nursery: trio.Nursery
) -> None:
    """The coordinator answers the plaintext handshake in plaintext (HTTP 400 and why),
    and watch says so at once. Before: the coordinator closed it without a word, and
    watch waited its whole connect timeout, then said "no handshake within 10 s"."""
    endpoints = await nursery.start(serve, tls_settings(settings, pki))
    plaintext = endpoints.status_url.replace("wss://", "ws://", 1)
    with trio.fail_after(5), pytest.raises(WatchError) as failed:
        await follow(plaintext, Recorder())
    assert str(failed.value) == (
        f"cannot connect to {plaintext}: HTTP 400: this port speaks TLS: use wss:// for the "
        "status stream, https:// for its pages"
    )


@pytest.mark.parametrize(
    ("identity", "trusted", "said"),
    [
        ("server", False, "unable to get local issuer certificate (give its CA with --ca)"),
        ("rogue", True, "unable to get local issuer certificate (it is not signed by the CA "
                        "in --ca)"),
        ("client", True, "IP address mismatch, certificate is not valid for '127.0.0.1'. "
                         "(connect by an address or name its certificate lists)"),
    ],
)  # fmt: skip
async def test_watch_says_why_the_coordinators_certificate_cannot_be_verified(
    settings: Settings,
    pki: Pki,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    identity: str,
    trusted: bool,
    said: str,
) -> None:
    """wss:// at a coordinator whose certificate watch cannot verify: from a CA the system
    does not trust (no --ca), from another CA than --ca's, naming another host: watch says
    so, with the verifier's reason and what to do. Before: "no handshake within 10 s"
    (trio-websocket waits out its connect timeout when TLS fails under it). The connect
    timeout is shortened here; the handshake of its own that tells why is not."""
    monkeypatch.setattr(watch_module, "_CONNECT_TIMEOUT", 0.5)
    monkeypatch.setattr(watch_module, "_OPEN_TIMEOUT", 1.5)
    cert = getattr(pki, identity)
    tls = settings.replace(tls_cert_file=str(cert.cert), tls_key_file=str(cert.key))
    endpoints = await nursery.start(serve, tls)
    with trio.fail_after(30), pytest.raises(WatchError) as failed:
        await follow(endpoints.status_url, Recorder(), ca=pki.ca if trusted else None)
    assert str(failed.value) == (
        f"cannot connect to {endpoints.status_url}: the coordinator's certificate cannot be "
        f"verified: {said}"
    )


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_watch_gives_up_on_a_peer_that_never_answers(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    """A peer that accepts the connection and never sends a byte: watch says so once its
    connect timeout is up (before: it waited for ever, trio-websocket's reader still
    reading after its own timeout)."""
    monkeypatch.setattr(watch_module, "_CONNECT_TIMEOUT", 1.0)
    monkeypatch.setattr(watch_module, "_OPEN_TIMEOUT", 2.0)
    monkeypatch.setattr(watch_module, "_DIAGNOSIS_TIMEOUT", 1.0)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, _silent, listeners)
    url = f"{scheme}://127.0.0.1:{listeners[0].socket.getsockname()[1]}/status"
    with trio.fail_after(30), pytest.raises(WatchError) as failed:
        await follow(url, Recorder())
    assert str(failed.value) == f"cannot connect to {url}: no handshake within 1 s"


async def _silent(stream: trio.SocketStream) -> None:
    await trio.sleep_forever()


async def test_watch_at_a_tls_coordinators_grpc_port_names_the_port_to_use(
    settings: Settings, pki: Pki, nursery: trio.Nursery
) -> None:
    """ws:// at the TLS gRPC port (PORT for STATUS_PORT): the coordinator answers the
    plaintext handshake in plaintext, and watch says so at once. Before: the gRPC port
    closed it without a word, and watch said "no handshake within 10 s" 10 s later."""
    endpoints = await nursery.start(serve, tls_settings(settings, pki))
    mistaken = f"ws://127.0.0.1:{endpoints.grpc_port}/status"
    with trio.fail_after(5), pytest.raises(WatchError) as failed:
        await follow(mistaken, Recorder())
    assert str(failed.value) == (
        f"cannot connect to {mistaken}: HTTP 400: this port speaks gRPC over TLS, for "
        "selectors: the status stream (wss://) and its pages (https://) are on the "
        "coordinator's STATUS_PORT"
    )


async def test_watch_shows_a_refusal_in_plain_text_but_not_a_web_page(
    nursery: trio.Nursery,
) -> None:
    """The text of a refusal is shown only if it is text: a web server's HTML error page
    (watch pointed at the webserver's port, a proxy's 502) is markup, not a reason. Before,
    watch showed the first 200 characters of the page, escapes and all:
    "HTTP 404: <!DOCTYPE html>\\n<html lang=..." instead of "HTTP 404"."""
    answers = {
        "/page": (b"text/html; charset=utf-8", b'<!DOCTYPE html>\n<html lang="en"><head>'),
        "/text": (b"Text/Plain; charset=utf-8", b"the status stream is at /status\n"),
    }

    async def handler(request: WebSocketRequest) -> None:
        content_type, body = answers[request.path]
        await request.reject(404, extra_headers=[(b"content-type", content_type)], body=body)

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    said_to = {"/page": "HTTP 404", "/text": "HTTP 404: the status stream is at /status"}
    for path, said in said_to.items():
        url = f"ws://127.0.0.1:{server.port}{path}"
        with trio.fail_after(5), pytest.raises(WatchError) as failed:
            await follow(url, Collected())
        assert str(failed.value) == f"cannot connect to {url}: {said}"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for each in sockets:
            each.bind(("127.0.0.1", 0))
        return [each.getsockname()[1] for each in sockets]
    finally:
        for each in sockets:
            each.close()


def test_watch_at_the_grpc_port_or_with_ca_on_ws_is_one_line(
    settings: Settings, layout: Layout, pki: Pki
) -> None:
    env = environment(layout.root)
    with Served(env) as coordinator:
        grpc_port, status_url = coordinator.ready()
        wrong = f"ws://127.0.0.1:{grpc_port}/status"
        result = run(["watch", wrong, "--plain"], env)
        assert (result.returncode, result.stderr) == (1, (
            f"fl-coordinator watch: cannot connect to {wrong}: it does not speak HTTP/1.1 (is "
            "that the coordinator's gRPC PORT? the status stream is on STATUS_PORT, 50052 by "
            "default)\n"
        ))  # fmt: skip
        result = run(["watch", status_url, "--plain", "--ca", str(pki.ca)], env)
        assert (result.returncode, result.stderr) == (2, (
            f"fl-coordinator watch: configuration error: --ca='{pki.ca}': expected a wss:// URL "
            f"to trust it for ({status_url} is plaintext)\n"
        ))  # fmt: skip


async def test_watch_follows_a_coordinator_across_its_restart(
    settings: Settings, layout: Layout
) -> None:
    grpc_port, status_port = _free_ports(2)
    env = environment(layout.root, PORT=str(grpc_port), STATUS_PORT=str(status_port))
    url = f"ws://127.0.0.1:{status_port}/status"
    with trio.fail_after(150), Served(env) as first:
        await trio.to_thread.run_sync(first.ready)
        process = await trio.lowlevel.open_process(
            [*COMMAND, "watch", url, "--plain"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert process.stdout is not None and process.stderr is not None
            out, notes = Lines(process.stdout), Lines(process.stderr)
            assert "SELECTION" in await out.until("round 1")
            first.process.send_signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(first.process.wait) == 0
            gone = await notes.until("closed")
            assert gone == (
                f"fl-coordinator watch: {url}: the coordinator closed the status stream; "
                "connecting again every 2 s (Ctrl-C stops)"
            )
            with Served(env) as second:
                await trio.to_thread.run_sync(second.ready)
                back = await notes.until("back")
                assert back == f"fl-coordinator watch: {url}: the status stream is back"
                before = len(out.seen)
                await out.until("SELECTION")  # the restarted coordinator's status, shown again
                assert len(out.seen) == before + 1 and out.seen[-1].split()[1:3] == ["round", "1"]
                process.send_signal(signal.SIGINT)
                assert await process.wait() == 0
                second.process.send_signal(signal.SIGTERM)
                assert await trio.to_thread.run_sync(second.process.wait) == 0
            assert notes.seen == [gone, back]  # one note when it went, one when it came back
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
