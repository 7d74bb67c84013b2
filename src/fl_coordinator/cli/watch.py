"""``fl-coordinator watch``: follow a coordinator's rounds from a terminal.

It is one more subscriber of the websocket status stream, exactly as the
webserver is, so what it shows is what the webserver is told. On a terminal
it draws a live panel (rich); otherwise (a pipe, a log file, CI) it writes one
plain line per change, which ``grep`` and ``tail -f`` can follow.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import ssl
import sys
import urllib.parse
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

import h11
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from ..errors import ConfigError, WatchError, first_of
from ..status.rounds import ENDED
from ..status.schema import StatusMessage
from ..untrusted_text import shown

__all__ = ["LiveView", "PlainView", "View", "durations", "follow", "summary", "watch"]

#: Seconds to wait for the coordinator to complete the websocket handshake.
_CONNECT_TIMEOUT = 10.0
#: Seconds the opening of the stream may take in all (trio-websocket's own limit, above,
#: does not end it when the peer never answers).
_OPEN_TIMEOUT = _CONNECT_TIMEOUT + 1.0
#: Seconds a TLS handshake of its own may take to tell why a wss:// handshake timed out.
_DIAGNOSIS_TIMEOUT = 5.0
#: Seconds between attempts to follow a coordinator again after its stream ended.
_RECONNECT = 2.0
#: What a failed handshake raises: refused, timed out, unreachable, or not HTTP/1.1 there.
_HANDSHAKE_FAILED = (HandshakeError, OSError, ValueError, h11.ProtocolError)
#: Status lines kept under the live panel.
_HISTORY = 8


def _seconds(time: str) -> float:
    return datetime.fromisoformat(time).timestamp()


def durations(message: StatusMessage) -> list[tuple[str, float | None]]:
    """Each stage of the round so far and how long it lasted, in seconds (None: still on).

    From the message's ``stages`` (when each began); the ended stages (COMPLETED,
    FAILED, FINISHED) have no duration and are left out. ``AGGREGATING`` lasts
    until the round ended.
    """
    stages = list(message.get("stages", {}).items())
    found: list[tuple[str, float | None]] = []
    for index, (stage, began) in enumerate(stages):
        if stage in ENDED:
            break
        following = stages[index + 1][1] if index + 1 < len(stages) else None
        found.append((stage, _seconds(following) - _seconds(began) if following else None))
    return found


def _took(message: StatusMessage) -> str:
    """The stages that ended, with their durations: 'SELECTION 1.20 s, CONFIGURATION 0.31 s'."""
    done = [(stage, seconds) for stage, seconds in durations(message) if seconds is not None]
    return ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in done)


def summary(message: StatusMessage) -> str:
    """The state of the round in one line, without the time (so repeats can be spotted)."""
    selectors = message.get("selectors", [])
    parts = [
        f"round {message['round']}",
        f"{message['stage']:<13}",
        f"clients {message.get('accepted', 0)}/{message.get('goal', '?')}",
        f"selectors {len(selectors)}",
        f"configured {len(message.get('configured', []))}",
        f"reported {len(message.get('reported', []))}",
    ]
    for key in ("unreachable", "rejected"):
        if message.get(key):
            parts.append(f"{key} {len(message[key])}")
    if message.get("held"):
        parts.append(f"held {message['held']}")
    if message.get("aggregating"):
        parts.append("aggregating")
    if message.get("aggregation_seconds") is not None:
        parts.append(f"aggregated in {message['aggregation_seconds']:.3f} s")
    if took := _took(message):
        parts.append(f"took {took}")
    if message.get("error"):
        parts.append(f"error: {message['error']}")
    if message.get("metrics"):
        parts.append(f"metrics of round {message['metrics']['round']}: {_values(message)}")
    if (spent := _privacy(message)) is not None:
        parts.append(f"privacy {spent}")
    if message.get("finished"):
        parts.append(f"finished: {message['finished']}")
    return "  ".join(parts)


def _privacy(message: StatusMessage) -> str | None:
    """The privacy spent (differential privacy), or None if the message carries none."""
    if "epsilon" not in message or "delta" not in message:
        return None
    return f"epsilon {message['epsilon']:.4g} at delta {message['delta']:g}"


def _values(message: StatusMessage) -> str:
    """The last evaluated round's metrics, in one short piece of a line."""
    values = message["metrics"]["values"]
    return ", ".join(f"{name} {value:.4g}" for name, value in values.items()) or "(none)"


class View(Protocol):
    def connected(self) -> None:
        """A (new) connection to the stream: its first message is shown even if unchanged."""

    def show(self, message: StatusMessage) -> None: ...


class _Changes:
    """Turns messages into timed lines, keeping only those whose summary changed."""

    def __init__(self) -> None:
        self._last: str | None = None

    def line(self, message: StatusMessage) -> str | None:
        text = summary(message)
        if text == self._last:
            return None
        self._last = text
        return f"{message.get('time', '')}  {text}"


class PlainView:
    """One line per change of the summary, prefixed by the message's time."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._changes = _Changes()

    def connected(self) -> None:
        self._changes = _Changes()

    def show(self, message: StatusMessage) -> None:
        line = self._changes.line(message)
        if line is None:
            return
        try:
            print(line, file=self._out, flush=True)
        except BrokenPipeError:  # `watch | head`: the reader is gone
            # Point the descriptor at /dev/null, or Python's own flush at exit
            # fails again and prints "Exception ignored ... BrokenPipeError".
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._out.fileno())
            raise WatchError("standard output was closed") from None


class LiveView:
    """A panel redrawn in place: the current round in detail, the last changes below."""

    def __init__(self, live: Any) -> None:
        self._live = live
        self._changes = _Changes()
        self._history: collections.deque[str] = collections.deque(maxlen=_HISTORY)

    def connected(self) -> None:
        self._changes = _Changes()

    def show(self, message: StatusMessage) -> None:
        line = self._changes.line(message)
        if line is not None:
            self._history.append(line)
        self._live.update(self._render(message), refresh=True)

    def _render(self, message: StatusMessage) -> Any:
        """The panel. Every value from the stream is a ``Text``, never markup: a
        selector id or an error with ``[...]`` in it must show as it is."""
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()

        def row(label: str, value: str, style: str = "") -> None:
            table.add_row(label, Text(value, style=style))

        aggregating = "  (aggregating)" if message.get("aggregating") else ""
        row("stage", message["stage"] + aggregating)
        row("clients", f"{message.get('accepted')} / {message.get('goal')} accepted")
        for key in ("selectors", "configured", "reported", "unreachable"):
            row(key, ", ".join(message.get(key, [])) or "-")
        for selector, reason in message.get("rejected", {}).items():
            row("rejected", f"{selector}: {reason}", "yellow")
        if message.get("held"):
            row("held", str(message["held"]))
        for stage, seconds in durations(message):
            row(stage.lower(), "under way" if seconds is None else f"took {seconds:.2f} s")
        if message.get("error"):
            row("error", message["error"], "red")
        if message.get("metrics"):
            row(f"round {message['metrics']['round']}", _values(message))
        if (spent := _privacy(message)) is not None:
            row("privacy", spent)
        if message.get("finished"):
            row("finished", message["finished"], "green")
        title = Text(f"{message.get('problem_id', '?')}  round {message['round']}")
        history = [Text(line, no_wrap=True, overflow="ellipsis") for line in self._history]
        return Group(Panel(table, title=title, title_align="left"), *history)


async def _show_each(ws: WebSocketConnection, view: View) -> None:
    try:
        while True:
            view.show(json.loads(await ws.get_message()))
    except ConnectionClosed:
        return


def _headers(token: str | None) -> list[tuple[bytes, bytes]] | None:
    # Sent on the handshake; a coordinator without STATUS_TOKEN ignores it.
    return [(b"authorization", f"Bearer {token}".encode())] if token else None


def _tls(ca: Path | None) -> ssl.SSLContext | None:
    """Trust ``ca`` (a coordinator with a certificate from a private CA) for ``wss://``."""
    if ca is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as error:
        raise WatchError(f"{ca}: not a readable PEM CA bundle ({error})") from None


async def follow(
    url: str,
    view: View,
    token: str | None = None,
    ca: Path | None = None,
    *,
    reconnect: float | None = None,
    note: Callable[[str], None] = lambda text: None,
) -> None:
    """Show every status message from ``url`` until the stream ends; raise WatchError.

    ``ca``: the CA of a ``wss://`` coordinator whose certificate the system
    does not trust (without it, the system's trust store). With
    ``reconnect`` (seconds), a stream that ends or breaks after it was
    followed (the coordinator restarts) is dialled again every ``reconnect``
    seconds until it answers, and ``note`` is told once when it went and once
    when it is back; a first connection that fails still raises.
    """
    tls = _tls(ca)
    followed = away = False
    while True:
        try:
            # trio-websocket 0.12, after its connect timeout, still waits for a peer that
            # accepted the connection and never answers (its reader task): the opening has
            # a limit of its own, lifted once the stream is followed.
            with trio.CancelScope(deadline=trio.current_time() + _OPEN_TIMEOUT) as opening:
                async with open_websocket_url(
                    url,
                    ssl_context=tls,
                    extra_headers=_headers(token),
                    connect_timeout=_CONNECT_TIMEOUT,
                ) as ws:
                    opening.deadline = math.inf
                    if away:
                        note(f"{url}: the status stream is back")
                    followed, away = True, False
                    view.connected()
                    await _show_each(ws, view)
            if opening.cancelled_caught:
                raise ConnectionTimeout
            error = WatchError(f"{url}: the coordinator closed the status stream")
        except (*_HANDSHAKE_FAILED, BaseExceptionGroup) as failure:
            if isinstance(failure, BaseExceptionGroup) and not failure.split(_HANDSHAKE_FAILED)[0]:
                raise
            reason = _reason(failure)
            if isinstance(failure, ConnectionTimeout):
                reason = await _unverified(url, tls) or reason
            error = WatchError(f"cannot connect to {url}: {reason}")
        if reconnect is None or not followed:
            raise error
        if not away:
            note(f"{error}; connecting again every {reconnect:g} s (Ctrl-C stops)")
            away = True
        await trio.sleep(reconnect)


#: OpenSSL's verify codes of a certificate from a CA not trusted here (self-signed, or its
#: issuer unknown).
_UNKNOWN_CA = {18, 19, 20, 21}
#: What to do about the other verify codes that have an obvious remedy.
_ADVICE = {
    62: "connect by a host name its certificate lists",  # X509_V_ERR_HOSTNAME_MISMATCH
    64: "connect by an address or name its certificate lists",  # X509_V_ERR_IP_ADDRESS_MISMATCH
}


async def _unverified(url: str, tls: ssl.SSLContext | None) -> str | None:
    """Why a ``wss://`` handshake got no answer, if it is the coordinator's certificate
    (None if not, or if that cannot be told within :data:`_DIAGNOSIS_TIMEOUT`).

    trio-websocket 0.12 does not notice a connection that fails before the
    server's answer, a certificate it cannot verify included: it waits out its
    connect timeout and says only that. A TLS handshake of our own tells why.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "wss" or not parts.hostname:
        return None
    try:
        with trio.move_on_after(_DIAGNOSIS_TIMEOUT):
            stream = await trio.open_ssl_over_tcp_stream(
                parts.hostname,
                parts.port or 443,
                ssl_context=tls or ssl.create_default_context(),
                https_compatible=True,
            )
            try:
                await stream.do_handshake()
            finally:
                await trio.aclose_forcefully(stream)
    except trio.BrokenResourceError as error:
        if isinstance(error.__cause__, ssl.SSLCertVerificationError):
            failure = error.__cause__
            advice = _ADVICE.get(failure.verify_code, "")
            if failure.verify_code in _UNKNOWN_CA:
                advice = "it is not signed by the CA in --ca" if tls else "give its CA with --ca"
            said = f"the coordinator's certificate cannot be verified: {failure.verify_message}"
            return f"{said} ({advice})" if advice else said
    except (OSError, ValueError):  # gone meanwhile; a port out of range
        pass
    return None


def _said(refusal: ConnectionRejected) -> str:
    """The text of an HTTP refusal ("" if none): its body, unless the server said it is
    something else than plain text (a web server's HTML error page is markup, not a reason)."""
    if not refusal.body:
        return ""
    for name, value in refusal.headers:
        if name.lower() == b"content-type":
            media_type = value.split(b";", 1)[0].strip().lower()
            if media_type != b"text/plain":
                return ""
    return refusal.body.decode("utf-8", "replace").strip()


def _reason(error: BaseException) -> str:
    """The most telling part of a failed connection: an HTTP status (with the server's
    plain text, escaped and cut) or an OS error."""
    if isinstance(error, BaseExceptionGroup):
        error = first_of(error, _HANDSHAKE_FAILED) or error
    if isinstance(error, h11.ProtocolError):
        return (
            "it does not speak HTTP/1.1 (is that the coordinator's gRPC PORT? the status "
            "stream is on STATUS_PORT, 50052 by default)"
        )
    if isinstance(error, ConnectionRejected):
        said = _said(error)
        return f"HTTP {error.status_code}: {shown(said)}" if said else f"HTTP {error.status_code}"
    if isinstance(error, ConnectionTimeout):
        return f"no handshake within {_CONNECT_TIMEOUT:.0f} s"
    cause: BaseException | None = error
    while cause is not None:  # trio wraps each address's OSError in a group, in an OSError
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.exceptions[0] if isinstance(cause, BaseExceptionGroup) else cause.__cause__
    root = error.__cause__ or error
    return str(root) or type(root).__name__


def _note(text: str) -> None:
    """A note of ``watch`` itself (not a status line): on stderr, one line."""
    print(f"fl-coordinator watch: {text}", file=sys.stderr, flush=True)


async def watch(
    url: str, token: str | None = None, *, plain: bool | None = None, ca: Path | None = None
) -> None:
    """``follow`` with the view that suits stdout: live panel on a terminal, else lines.

    A coordinator that restarts (or a stream that breaks) is followed again when
    it is back, with a note on stderr; Ctrl-C stops.
    """
    if ca is not None and not url.startswith("wss://"):
        raise ConfigError("--ca", str(ca), f"a wss:// URL to trust it for ({url} is plaintext)")
    follow_here = functools.partial(follow, reconnect=_RECONNECT, note=_note)
    if plain is None:
        plain = not sys.stdout.isatty()
    if plain:
        await follow_here(url, PlainView(sys.stdout), token, ca)
        return
    from rich.live import Live

    with Live(auto_refresh=False, transient=False) as live:
        await follow_here(url, LiveView(live), token, ca)
