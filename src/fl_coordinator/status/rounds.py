"""The record of a round that ended, as ``GET /rounds`` serves it (and the round log keeps it).

A record is made from the round's last status message (:func:`record_of`),
which is a complete snapshot: the time each stage began, clients accepted
and the goal, and what became of each selector. The checkpoint's SHA-256 is
added by the round log, which reads the file off the event loop. The README's
"Round history" section documents each field with an example.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

from .schema import StatusMessage

__all__ = ["ENDED", "RoundRecord", "SelectorFate", "record_of"]

#: The stages a round ends in ("FINISHED" joins them with the stop rule of issue 14).
ENDED = frozenset({"COMPLETED", "FAILED", "FINISHED"})


class SelectorFate(TypedDict):
    """What became of one selector that held clients of the round."""

    selector: str
    # selected (never told: the round ended first), configured, unreachable,
    # reported, or rejected (its files were refused: ``reason`` says why)
    fate: str
    reason: NotRequired[str]


class RoundRecord(TypedDict):
    round: int
    outcome: str  # COMPLETED or FAILED (FINISHED once issue 14's stop rule ends the problem)
    stages: dict[str, str]  # stage (AGGREGATING included) -> when it began, ISO 8601 UTC
    ended: str  # when the round ended (its outcome's stage began)
    accepted: int
    goal: int
    selectors: list[SelectorFate]
    aggregation_seconds: float | None  # None unless it aggregated
    checkpoint_sha256: str | None  # of the checkpoint it produced (COMPLETED only)
    error: NotRequired[str]  # FAILED only
    metrics: NotRequired[dict[str, float]]  # once the round's checkpoint was evaluated (issue 14)
    finished: NotRequired[str]  # the run ended after (or in) this round: why (issue 14)
    epsilon: NotRequired[float]  # differential privacy: spent once this round ended (issue 18)
    delta: NotRequired[float]


def _fates(message: StatusMessage) -> list[SelectorFate]:
    """Each selector's fate, in check-in order: looked up in sets, so a round of thousands
    of selectors costs linear time on the event loop (list lookups made it quadratic)."""
    rejected = message["rejected"]
    found: dict[str, str] = {}
    for fate in ("configured", "unreachable", "reported"):  # the later fate wins
        found.update(dict.fromkeys(message[fate], fate))  # type: ignore[literal-required]
    fates: list[SelectorFate] = []
    for selector in message["selectors"]:
        if selector in rejected:
            fates.append({"selector": selector, "fate": "rejected", "reason": rejected[selector]})
        else:
            fates.append({"selector": selector, "fate": found.get(selector, "selected")})
    return fates


def record_of(message: StatusMessage) -> RoundRecord:
    """The record of the round that ``message`` (a status message in an :data:`ENDED` stage) ends.

    ``checkpoint_sha256`` is left None: the round log fills it in.
    """
    record: RoundRecord = {
        "round": message["round"],
        "outcome": message["stage"],
        "stages": dict(message["stages"]),
        "ended": message["stage_started"],
        "accepted": message["accepted"],
        "goal": message["goal"],
        "selectors": _fates(message),
        "aggregation_seconds": message.get("aggregation_seconds"),
        "checkpoint_sha256": None,
    }
    if "error" in message:
        record["error"] = message["error"]
    if "finished" in message:
        record["finished"] = message["finished"]  # type: ignore[typeddict-item]
    if "epsilon" in message and "delta" in message:
        record["epsilon"], record["delta"] = message["epsilon"], message["delta"]
    return record
