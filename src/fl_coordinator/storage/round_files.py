"""The problem folder as the round task uses it: validate, aggregate, journal, off the event loop.

The round task (:mod:`fl_coordinator.coordinator`) is handed one
:class:`RoundFiles` by the composition root and never touches a path or a
file itself: every method here does its blocking work in a worker thread, so
the event loop keeps answering check-ins, the health service and the status
stream while HDF5 files are read and written.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import trio

from .aggregation import (
    AggregationResult,
    Aggregator,
    Contribution,
    aggregate,
    check_contribution,
)
from .journal import Entry, remember, write_journal
from .layout import Layout

__all__ = ["RoundFiles"]


class RoundFiles:
    """Blocking file work of one problem, as awaitables. Errors: AggregationError, OSError.

    ``aggregator`` is the averaging function run in a worker thread (tests and
    benchmarks pass a wrapped one to observe or pace it); after it succeeds
    the new checkpoint is kept in the history (``keep`` checkpoints).
    """

    def __init__(
        self, layout: Layout, *, aggregator: Aggregator = aggregate, keep: int = 5
    ) -> None:
        self.layout = layout
        self._aggregator = aggregator
        self._keep = keep

    def _contribution(self, selector: str) -> Contribution:
        layout = self.layout
        return Contribution(selector, layout.agg_checkpoint(selector), layout.agg_weight(selector))

    async def validate(self, selector: str) -> None:
        """Raise AggregationError unless ``selector``'s files can be averaged in."""
        contribution = self._contribution(selector)
        await trio.to_thread.run_sync(
            check_contribution, self.layout.checkpoint, contribution, abandon_on_cancel=True
        )

    async def aggregate(self, number: int, selectors: Sequence[str]) -> AggregationResult:
        """Average ``selectors``' aggregates into the checkpoint of round ``number``.

        If the caller is cancelled (shutdown), the worker thread is told to stop
        at its next slab and the checkpoint is left as it was.
        """
        contributions = [self._contribution(s) for s in selectors]
        stop = threading.Event()

        def job() -> AggregationResult:
            result = self._aggregator(self.layout.checkpoint, contributions, self.layout.tmp, stop)
            remember(self.layout, number, self._keep)
            return result

        try:
            return await trio.to_thread.run_sync(job, abandon_on_cancel=True)
        finally:
            stop.set()

    async def write_journal(self, entry: Entry) -> None:
        """Record ``entry`` in the journal (atomically replaced, fsynced)."""
        await trio.to_thread.run_sync(write_journal, self.layout, entry)
