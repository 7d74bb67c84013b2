"""What the status port answers to plain HTTP GETs: the dashboard, ``/status`` and ``/rounds``.

``GET /`` is the dashboard (``static/index.html``, with its script, style
and the vendored uPlot chart library, all in the package: it works with no
internet). The page holds no data and no secret, so it is served to anyone;
``GET /status`` (the latest status message) and ``GET /rounds`` (the round
history, :mod:`.rounds`) follow the websocket's rule: with ``STATUS_TOKEN``
set, ``Authorization: Bearer <token>`` or HTTP 401.

``/rounds?before=N&limit=K``: the records of the rounds numbered below ``N``
(all if absent), newest first, at most ``K`` (1 to :data:`MAX_LIMIT`,
default :data:`DEFAULT_LIMIT`) and, beyond the first, no more than
:data:`MAX_PAGE_BYTES` of them; ``next_before`` is the ``before`` of the next
page (None on the last). The byte bound is what keeps a page cheap: a record
lists every selector of its round, and 1,000 records of 2,000 selectors were
107 MB of JSON, built on the event loop in 3.8 s for anyone who asked.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import urllib.parse
from collections.abc import Callable
from typing import Any

from ..rpc.auth import bearer_problem
from .http import Answer, Head
from .rounds import RoundRecord
from .schema import StatusMessage

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "MAX_PAGE_BYTES", "Pages"]

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: Records of one page, in bytes of JSON, at most (a larger record is served alone).
MAX_PAGE_BYTES = 1 << 20

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".LICENSE": "text/plain; charset=utf-8",
}
_JSON = "application/json"


@functools.cache
def _static() -> dict[str, tuple[bytes, str]]:
    """The dashboard's files by name, with their content type (read once, they are small)."""
    folder = importlib.resources.files(__package__) / "static"
    found = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in _TYPES:
            found[item.name] = (item.read_bytes(), _TYPES[suffix])
    return found


def _json(value: Any, status: int = 200) -> Answer:
    return Answer(status, json.dumps(value).encode(), _JSON, [("cache-control", "no-store")])


def _error(status: int, reason: str) -> Answer:
    return Answer(status, f"{reason}\n".encode())


def _int_parameter(query: dict[str, list[str]], name: str, least: int) -> int | None:
    """The integer query parameter ``name``, at least ``least`` (None if absent). Raises
    ValueError."""
    values = query.get(name)
    if not values:
        return None
    text = values[-1]
    if not text.isascii() or not text.isdigit() or len(text) > 12 or int(text) < least:
        raise ValueError(f"{name} must be a whole number >= {least}, not {text[:20]!r}")
    return int(text)


class Pages:
    """Answers the status port's plain HTTP requests.

    ``latest()`` is the current status message (None before the first),
    ``rounds(before, limit)`` the round history page.
    """

    def __init__(
        self,
        problem_id: str,
        latest: Callable[[], StatusMessage | None],
        rounds: Callable[[int | None, int], list[RoundRecord]],
        token: str = "",
    ) -> None:
        self._problem_id = problem_id
        self._latest = latest
        self._rounds = rounds
        self._token = token

    def answer(self, head: Head) -> Answer:
        if not head.reads:
            return _error(405, "only GET or HEAD (or a websocket upgrade at /status)")
        path = head.path
        if path in ("/", "/index.html"):
            path = "/static/index.html"
        if path.startswith("/static/"):
            found = _static().get(path.removeprefix("/static/"))
            if found is None:
                return _error(404, "no such file")
            return Answer(200, found[0], found[1], [("cache-control", "no-cache")])
        if path not in ("/status", "/rounds"):
            return _error(404, "the dashboard is at /, the data at /status and /rounds")
        if self._token:
            authorization = head.header(b"authorization")
            text = authorization.decode("latin-1") if authorization is not None else None
            problem = bearer_problem(text, self._token)
            if problem is not None:
                answer = _error(401, f"unauthorized: {problem}")
                answer.headers.append(("www-authenticate", "Bearer"))
                return answer
        if path == "/status":
            latest = self._latest()
            return _json(latest) if latest is not None else _error(503, "no status yet")
        return self._history(head.query)

    def _history(self, query_text: str) -> Answer:
        query = urllib.parse.parse_qs(query_text)
        try:
            before = _int_parameter(query, "before", 0)
            limit = _int_parameter(query, "limit", 1)
        except ValueError as error:
            return _error(400, str(error))
        if limit is None:
            limit = DEFAULT_LIMIT
        if limit > MAX_LIMIT:
            return _error(400, f"limit must be between 1 and {MAX_LIMIT}")
        records = self._rounds(before, limit)
        served: list[bytes] = []
        size = 0
        for record in records:
            text = json.dumps(record).encode()
            if served and size + len(text) > MAX_PAGE_BYTES:
                break
            served.append(text)
            size += len(text)
        last = records[len(served) - 1]["round"] if served else 0
        more = last > 1 and (len(served) < len(records) or len(records) == limit)
        head = json.dumps({"problem_id": self._problem_id})[:-1].encode()
        tail = json.dumps(last if more else None).encode()
        body = head + b', "rounds": [' + b", ".join(served) + b'], "next_before": ' + tail + b"}"
        return Answer(200, body, _JSON, [("cache-control", "no-store")])
