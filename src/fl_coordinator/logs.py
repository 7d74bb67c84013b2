"""Logging set-up for the command line: human-readable lines, or JSON lines.

``LOG_FORMAT=json`` writes one JSON object per line (``time``, ``level``,
``logger``, ``event``, and ``round`` / ``selector`` / ``peer`` when known), which log
shippers (Loki, Elasticsearch, CloudWatch, ...) index without a parsing rule.

``round``, ``selector`` and ``peer`` (the address of the connection a line
is about) come from :func:`log_context`, a context variable set by the task
doing the work (trio tasks each have their own copy of the
context, so concurrent broadcasts to two selectors never see each other's
fields), or from ``extra={"round": ..., "selector": ...}`` on one call.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

__all__ = ["NOISY", "JsonFormatter", "context_field", "log_context", "setup_logging"]

#: The structured fields a log line may carry, in the order they are written.
_FIELDS = ("round", "selector", "peer")


_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "fl_log_context", default=MappingProxyType({})
)

#: Loggers kept at WARNING or above whatever LOG_LEVEL says.
NOISY = ("httpx", "httpcore", "trio-websocket", "hpack", "h2")


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach ``fields`` (``round``, ``selector``) to every line logged in this block.

    A field given as None is removed: a task spawned while an event about one
    selector was handled (an aggregation, say) must not log under its name.
    """
    merged = {**_context.get(), **fields}
    token = _context.set({name: value for name, value in merged.items() if value is not None})
    try:
        yield
    finally:
        _context.reset(token)


def context_field(name: str) -> Any:
    """The value of field ``name`` in the current log context, None if unset."""
    return _context.get().get(name)


def _context_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of ``record``: the context's, overridden by ``extra=``."""
    fields = dict(_context.get())
    for name in _FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            fields[name] = value
    return {name: fields[name] for name in _FIELDS if name in fields}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a traceback, if any, goes in ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, Any] = {
            "time": time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            **_context_fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%dT%H:%M:%S"
    )


def setup_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at ``level``, as ``text`` (for people) or ``json`` (for shippers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler])
    # Third-party chatter that says nothing an operator can act on. hpack and h2
    # also log raw HTTP/2 headers at DEBUG, bearer tokens included: they stay at
    # WARNING even with LOG_LEVEL=DEBUG.
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
