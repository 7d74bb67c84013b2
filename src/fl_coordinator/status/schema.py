"""The status message: one JSON object per change of the round, a complete snapshot.

This is the contract with the webserver (and ``fl-coordinator watch``, the
webhook, the metrics): every subscriber of the websocket status stream
receives these objects, as JSON text. The README's "status stream" section
documents each field with an example.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NotRequired, TypedDict

from ..core.events import Status
from ..core.stages import Stage

__all__ = ["EvaluatedMetrics", "StatusMessage", "to_message", "utc_now"]


class EvaluatedMetrics(TypedDict):
    """The metrics ``EVALUATE`` measured on the checkpoint of round ``round``."""

    round: int
    values: dict[str, float]


class StatusMessage(TypedDict):
    """One status message. Stage names are fl_status.proto's, plus ``FAILED`` and ``FINISHED``."""

    problem_id: str
    seq: int  # 1, 2, ... in the order published
    time: str  # ISO 8601, UTC, milliseconds, "Z"
    round: int
    stage: str  # SELECTION, CONFIGURATION, REPORTING, COMPLETED, FAILED or FINISHED
    accepted: int
    goal: int
    selectors: list[str]
    reported: list[str]
    configured: list[str]
    unreachable: list[str]
    rejected: dict[str, str]  # selector -> why its files were refused
    ignored: list[list[str]]  # [selector, why] of calls that changed nothing
    aggregating: bool
    held: int  # check-ins waiting for the next round
    checkpoint: NotRequired[str]  # COMPLETED only
    aggregation_seconds: NotRequired[float | None]  # COMPLETED only
    error: NotRequired[str]  # FAILED only
    metrics: NotRequired[EvaluatedMetrics]  # once a round has been evaluated: the latest
    finished: NotRequired[str]  # FINISHED only: why the run ended, and how to go on


def utc_now() -> datetime:
    return datetime.now(UTC)


def to_message(
    status: Status, *, problem_id: str, seq: int, time: datetime, checkpoint: str
) -> StatusMessage:
    """The status message of snapshot ``status``, published as number ``seq`` at ``time``."""
    message: StatusMessage = {
        "problem_id": problem_id,
        "seq": seq,
        "time": time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "round": status.round,
        "stage": status.stage.name,
        "accepted": status.accepted,
        "goal": status.goal,
        "selectors": list(status.selectors),
        "reported": list(status.reported),
        "configured": list(status.configured),
        "unreachable": list(status.unreachable),
        "rejected": dict(status.rejected),
        "ignored": [list(pair) for pair in status.ignored],
        "aggregating": status.aggregating,
        "held": status.held,
    }
    if status.stage is Stage.COMPLETED:
        message["checkpoint"] = checkpoint
        message["aggregation_seconds"] = status.aggregation_seconds
    if status.error is not None:
        message["error"] = status.error
    if status.metrics is not None:
        message["metrics"] = {"round": status.metrics.round, "values": dict(status.metrics.values)}
    if status.finished is not None:
        message["finished"] = status.finished
    return message
