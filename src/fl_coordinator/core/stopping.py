"""When a run ends: ``STOP_WHEN`` conditions on evaluated metrics, and the metrics themselves.

A run ends after round ``ROUNDS`` (0: never) or as soon as the metrics of
an evaluated round meet ``STOP_WHEN`` (``accuracy>=0.95``: a metric the
``EVALUATE`` function returns, a comparison, a number). Pure values: the
round machine decides with them, the configuration parses with them.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["METRIC_NAME", "RoundMetrics", "StopWhen", "decimal"]

#: What a metric may be called: a Prometheus name part, so each is a gauge of its own.
METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

#: A number as an operator writes one: ASCII digits, a point, an exponent.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def decimal(text: str) -> float:
    """The finite number ``text`` writes (``0.95``, ``-1``, ``1e-3``); ValueError otherwise.

    Stricter than ``float()``, which also reads other scripts' digits (``"\\uff11"``,
    ``"\\u0661"``), underscores (``"1_000"``), ``nan`` and ``inf``: a value an
    operator did not mean as that number is refused, not guessed.
    """
    stripped = text.strip()
    if not _DECIMAL.fullmatch(stripped):
        raise ValueError(f"not a number: {text!r}")
    number = float(stripped)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {text!r}")
    return number


_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}

_CONDITION = re.compile(rf"\s*({METRIC_NAME.pattern})\s*(>=|<=|>|<)\s*(\S+)\s*")


@dataclass(frozen=True)
class RoundMetrics:
    """What the evaluation of round ``round`` measured: (name, value) pairs, in order."""

    round: int
    values: tuple[tuple[str, float], ...]

    def as_dict(self) -> dict[str, object]:
        """The form the status message and the journal carry: ``{"round": N, "values": {...}}``."""
        return {"round": self.round, "values": dict(self.values)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> RoundMetrics:
        values = data["values"]
        if not isinstance(values, Mapping):
            raise TypeError("values is not a mapping")
        number = data["round"]
        if not isinstance(number, int):
            raise TypeError("round is not an integer")
        return cls(number, tuple((str(k), float(v)) for k, v in values.items()))

    def describe(self) -> str:
        return ", ".join(f"{name}={value:.4g}" for name, value in self.values)


@dataclass(frozen=True)
class StopWhen:
    """``metric`` compared with ``threshold`` by ``comparison`` (``>=``, ``<=``, ``>``, ``<``)."""

    metric: str
    comparison: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> StopWhen:
        """``"accuracy>=0.95"``; ValueError if it is not such a condition."""
        match = _CONDITION.fullmatch(text)
        if match is None:
            raise ValueError(f"not a condition: {text!r}")
        return cls(match.group(1), match.group(2), decimal(match.group(3)))

    def met(self, metrics: RoundMetrics) -> bool:
        """Whether ``metrics`` meet the condition (a metric they lack never does)."""
        value = dict(metrics.values).get(self.metric)
        return value is not None and _COMPARISONS[self.comparison](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.metric}{self.comparison}{self.threshold:g}"
