"""Log lines as JSON objects, with round/selector from the task's context (in-process and CLI)."""

from __future__ import annotations

import io
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers.peers import one_selector_round
from helpers.processes import Served, environment

from fl_coordinator.config import Settings, load_settings
from fl_coordinator.errors import ConfigError
from fl_coordinator.logs import JsonFormatter, log_context


def record(message: str, exc_info: Any = None) -> logging.LogRecord:
    return logging.LogRecord(
        "fl_coordinator.x", logging.WARNING, __file__, 1, message, (), exc_info
    )


def test_json_line_has_time_level_event_and_context() -> None:
    formatter = JsonFormatter()
    plain = json.loads(formatter.format(record("hello")))
    assert set(plain) == {"time", "level", "logger", "event"}
    assert plain["level"] == "WARNING" and plain["event"] == "hello"
    assert plain["time"].endswith("Z") and plain["logger"] == "fl_coordinator.x"

    with log_context(round=3, selector="a:1"), log_context(selector="10.0.0.5:50051"):
        line = json.loads(formatter.format(record("told")))
        with log_context(selector=None):
            unnamed = json.loads(formatter.format(record("averaged")))
    assert (line["round"], line["selector"]) == (3, "10.0.0.5:50051")
    assert unnamed["round"] == 3 and "selector" not in unnamed
    assert "round" not in json.loads(formatter.format(record("after")))  # context restored

    explicit = record("x")
    explicit.round = 7  # what logging does with extra={"round": 7}
    with log_context(round=3):
        assert json.loads(formatter.format(explicit))["round"] == 7


def test_json_line_carries_the_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logged = record("failed", sys.exc_info())
    line = json.loads(JsonFormatter().format(logged))
    assert "RuntimeError: boom" in line["exception"]


def test_log_format_setting() -> None:
    assert load_settings({}, {"LOG_FORMAT": "JSON"})[0].log_format == "json"
    assert load_settings({}, {})[0].log_format == "text"
    with pytest.raises(ConfigError, match="LOG_FORMAT='xml': expected text or json"):
        load_settings({}, {"LOG_FORMAT": "xml"})


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The coordinator's log records, formatted as JSON lines, at INFO."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("fl_coordinator")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


async def test_a_round_logs_its_round_and_selectors(
    settings: Settings,
    keras_weights: list[Path],
    nursery: trio.Nursery,
    json_lines: io.StringIO,
) -> None:
    done = await one_selector_round(nursery, settings, keras_weights[0], weight=2)
    (selector_id,) = done["selectors"]

    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    told = [line for line in lines if "to configure" in line["event"]]
    assert told and told[0]["round"] == 1 and told[0]["selector"] == selector_id
    averaged = [line for line in lines if line["event"].startswith("round 1: averaged")]
    assert averaged and averaged[0]["round"] == 1 and "selector" not in averaged[0]


def test_serve_writes_json_lines(settings: Settings) -> None:
    server = Served(environment(Path(settings.fl_root_path), LOG_FORMAT="json", LOG_LEVEL="INFO"))
    try:
        server.wait_for_line("status stream at")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=10) == 0
    finally:
        server.process.kill()
    lines = [json.loads(line) for line in server.rest().splitlines()]
    assert all({"time", "level", "event", "logger"} <= set(line) for line in lines)
    opened = [line for line in lines if "selection open" in line["event"]]
    assert opened and opened[0]["round"] == 1 and opened[0]["level"] == "INFO"
