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

__all__ = [
    "EvaluatedMetrics",
    "StatusMessage",
    "phase_name",
    "timestamp",
    "to_message",
    "utc_now",
]


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
    stage_started: str  # when the current stage began (ISO 8601, as ``time``)
    stages: dict[str, str]  # this round's stages (AGGREGATING included) -> when each began
    checkpoint: NotRequired[str]  # COMPLETED only
    aggregation_seconds: NotRequired[float | None]  # COMPLETED only
    error: NotRequired[str]  # FAILED only
    metrics: NotRequired[EvaluatedMetrics]  # once a round has been evaluated: the latest
    finished: NotRequired[str]  # FINISHED only: why the run ended, and how to go on
    epsilon: NotRequired[float]  # differential privacy only: spent by the released rounds
    delta: NotRequired[float]  # ... at this delta (DP_DELTA)


def utc_now() -> datetime:
    return datetime.now(UTC)


def timestamp(time: datetime) -> str:
    """``time`` as the status messages write it: ISO 8601, UTC, milliseconds, "Z"."""
    return time.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def phase_name(status: Status) -> str:
    """The name of the part of the round ``status`` is in: its stage, or AGGREGATING."""
    return "AGGREGATING" if status.aggregating else status.stage.name


def to_message(
    status: Status,
    *,
    problem_id: str,
    seq: int,
    time: str,
    checkpoint: str,
    stages: dict[str, str],
) -> StatusMessage:
    """The status message of snapshot ``status``, published as number ``seq`` at ``time``.

    ``stages``: when each stage of this round began (:func:`timestamp` strings).
    """
    message: StatusMessage = {
        "problem_id": problem_id,
        "seq": seq,
        "time": time,
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
        "stage_started": stages[status.stage.name],
        "stages": dict(stages),
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
    if status.privacy is not None:
        message["epsilon"] = status.privacy.epsilon
        message["delta"] = status.privacy.delta
    return message
