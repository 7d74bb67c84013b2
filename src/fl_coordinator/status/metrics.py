"""Prometheus metrics of one coordinator, derived from its status stream.

Most metrics are *derived*: :meth:`Metrics.follow` reads the
:class:`~.status.StatusHub` like any other subscriber, so the round logic
knows nothing about Prometheus and the numbers an operator graphs are the
ones the webserver is shown. What the stream does not carry comes from a few
hooks that the server wires in: answers to check-ins (refusals at the RPC edge
never reach the round), bytes read by the aggregation (the aggregator is
wrapped), the number of websocket subscribers, undelivered webhook
messages and stage changes the legacy status push dropped. The metrics of the
last evaluated round (``EVALUATE``) are a gauge each,
``fl_coordinator_evaluation_<name>``, created when a name is first seen.
Under differential privacy the privacy spent is two gauges,
``fl_coordinator_privacy_epsilon`` and ``fl_coordinator_privacy_delta``
(created with the first message that carries them: without DP there are none,
rather than a misleading 0).

Each coordinator has its own :class:`~prometheus_client.CollectorRegistry`,
not the process-wide default one, so several coordinators in one process
(tests, benchmarks) never share or clash over a metric.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest

from ..core.stages import SHOWN_STAGES, Stage
from ..storage.aggregation import AggregationResult, Aggregator, Contribution, ServerUpdate
from .hub import StatusHub, Subscription
from .schema import EvaluatedMetrics, StatusMessage

__all__ = ["MAX_EVALUATION_GAUGES", "Metrics"]

_NAMESPACE = "fl_coordinator"

#: Aggregation durations span milliseconds (small models) to minutes (large ones).
_AGGREGATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

_FINISHED = (Stage.COMPLETED.name, Stage.FAILED.name)

#: Evaluation gauges made at most (names come from the EVALUATE function).
MAX_EVALUATION_GAUGES = 64


class Metrics:
    """The metrics of one coordinator, in a registry of their own."""

    def __init__(self, problem_id: str) -> None:
        self.registry = CollectorRegistry()
        common = {"namespace": _NAMESPACE, "registry": self.registry}
        Info("problem", "The FL problem this coordinator serves.", **common).info(
            {"problem_id": problem_id}
        )
        self.rounds_completed = Counter(
            "rounds_completed", "Rounds that produced a new global checkpoint.", **common
        )
        self.rounds_failed = Counter(
            "rounds_failed", "Rounds abandoned (global checkpoint kept as it was).", **common
        )
        self.round = Gauge("round", "Number of the current round.", **common)
        self.stage = Enum(
            "stage", "Stage of the current round.", states=[s.name for s in SHOWN_STAGES], **common
        )
        self.accepted = Gauge(
            "round_accepted_clients", "Clients accepted so far in the current round.", **common
        )
        self.checkins = Counter(
            "checkins",
            "Clients checked in (ClientCountUpdate, or CheckInClients batches), by answer.",
            ["result"],
            **common,
        )
        self.aggregation_seconds = Histogram(
            "aggregation_seconds",
            "Duration of the aggregations of completed rounds.",
            buckets=_AGGREGATION_BUCKETS,
            **common,
        )
        self.aggregated_bytes = Counter(
            "aggregated_bytes", "Bytes of checkpoints read by aggregations.", **common
        )
        self.subscribers = Gauge(
            "status_subscribers", "Websocket subscribers of the status stream.", **common
        )
        self.webhook_failures = Counter(
            "webhook_failures", "Status messages the webhook could not deliver.", **common
        )
        self.legacy_push_drops = Counter(
            "legacy_push_drops",
            "Stage changes the legacy status push dropped undelivered (its queue was full).",
            **common,
        )
        self.evaluated_round = Gauge(
            "evaluated_round", "Round whose metrics the evaluation gauges show.", **common
        )
        self._common = common
        self._evaluation: dict[str, Gauge] = {}
        self._privacy: tuple[Gauge, Gauge] | None = None
        # Exported as 0 before the first check-in; kept, as a label lookup per call costs.
        self._accepted_clients = self.checkins.labels("accepted")
        self._refused_clients = self.checkins.labels("refused")

        self._counted_up_to = 0  # the last round whose end was counted
        self._subscription: Subscription | None = None

    # -- derived from the status stream ---------------------------------------

    def observe(self, message: StatusMessage) -> None:
        """Update the gauges from one status message, and count a round's end once."""
        number, stage = message["round"], message["stage"]
        self.round.set(number)
        self.stage.state(stage)
        self.accepted.set(message["accepted"])
        if "metrics" in message:
            self._evaluated(message["metrics"])
        if "epsilon" in message and "delta" in message:
            self._spent(message["epsilon"], message["delta"])
        if stage in _FINISHED and number > self._counted_up_to:
            self._counted_up_to = number
            if stage == Stage.COMPLETED.name:
                self.rounds_completed.inc()
                self.aggregation_seconds.observe(message["aggregation_seconds"] or 0.0)
            else:
                self.rounds_failed.inc()

    async def follow(
        self, hub: StatusHub, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Observe every message of ``hub`` until cancelled (started once subscribed)."""
        with hub.subscribe() as subscription:
            self._subscription = subscription
            task_status.started()
            try:
                while True:
                    self.observe((await subscription.next()).message)
            finally:
                self._subscription = None

    def _spent(self, epsilon: float, delta: float) -> None:
        if self._privacy is None:
            self._privacy = (
                Gauge(
                    "privacy_epsilon",
                    "Differential privacy spent by the released rounds: epsilon at delta.",
                    **self._common,
                ),
                Gauge("privacy_delta", "The delta of privacy_epsilon (DP_DELTA).", **self._common),
            )
        self._privacy[0].set(epsilon)
        self._privacy[1].set(delta)

    def _evaluated(self, metrics: EvaluatedMetrics) -> None:
        """A gauge per metric name: the value of the last evaluated round."""
        self.evaluated_round.set(metrics["round"])
        for name, value in metrics["values"].items():
            gauge = self._evaluation.get(name)
            if gauge is None:
                if len(self._evaluation) >= MAX_EVALUATION_GAUGES:
                    continue  # names are bounded per round, not over rounds
                gauge = self._evaluation[name] = Gauge(
                    f"evaluation_{name}",
                    f"{name} of the last evaluated round (EVALUATE).",
                    **self._common,
                )
            gauge.set(value)

    def render(self) -> bytes:
        """The exposition text; first takes in any message not yet observed.

        So a scrape that follows a status change always shows it, even if the
        :meth:`follow` task has not run since.
        """
        if self._subscription is not None:
            for published in self._subscription.take_ready():
                self.observe(published.message)
        return generate_latest(self.registry)

    # -- hooks for what the stream does not carry ---------------------------------

    def checked_in(self, asked: int, accepted: int) -> None:
        """A check-in (one client, or a batch of ``asked``) was answered (hot path)."""
        if accepted:
            self._accepted_clients.inc(accepted)
        if asked > accepted:
            self._refused_clients.inc(asked - accepted)

    def webhook_failed(self) -> None:
        self.webhook_failures.inc()

    def legacy_push_dropped(self) -> None:
        self.legacy_push_drops.inc()

    def count_subscribers(self, count: Callable[[], int]) -> None:
        """Read the subscriber gauge from ``count`` at each scrape."""
        self.subscribers.set_function(count)

    def measured(self, aggregator: Aggregator) -> Aggregator:
        """``aggregator``, also counting the bytes it reads (runs in its worker thread)."""

        def run(
            checkpoint: Path,
            contributions: Sequence[Contribution],
            tmp: Path,
            cancel: threading.Event | None,
            update: ServerUpdate,
        ) -> AggregationResult:
            result = aggregator(checkpoint, contributions, tmp, cancel, update)
            self.aggregated_bytes.inc(result.bytes_read)  # prometheus_client is thread-safe
            return result

        return run
