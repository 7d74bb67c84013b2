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

from ..errors import AggregationError
from .aggregation import (
    AggregationResult,
    Aggregator,
    Contribution,
    aggregate,
    check_contribution,
)
from .checkpoint import retry_while_locked
from .journal import keep_in_history
from .journal_writer import JournalWriter
from .layout import Layout
from .weights import Weight

__all__ = ["RoundFiles"]


class RoundFiles:
    """Blocking file work of one problem, as awaitables. Errors: AggregationError.

    ``plan`` is the global checkpoint's weight arrays (read at start-up), which
    every selector's files are validated against: a validation never opens
    the global checkpoint, so another process holding it locked is no
    selector's fault. ``aggregator`` is the averaging function run in a worker
    thread (tests and benchmarks pass a wrapped one to observe or pace it);
    after it succeeds the new checkpoint is kept in the history (``keep``
    checkpoints). While another process holds the global checkpoint locked
    the aggregation waits up to ``lock_patience`` seconds (0: until it goes).
    :attr:`journal` is the round journal's one writer.
    """

    def __init__(
        self,
        layout: Layout,
        plan: Sequence[Weight],
        *,
        aggregator: Aggregator = aggregate,
        keep: int = 5,
        lock_patience: float = 0.0,
    ) -> None:
        self.layout = layout
        self.journal = JournalWriter(layout)
        self._plan = tuple(plan)
        self._aggregator = aggregator
        self._keep = keep
        self._lock_patience = lock_patience

    def _contribution(self, selector: str) -> Contribution:
        layout = self.layout
        return Contribution(selector, layout.agg_checkpoint(selector), layout.agg_weight(selector))

    async def validate(self, selector: str) -> None:
        """Raise AggregationError unless ``selector``'s files can be averaged in."""
        contribution = self._contribution(selector)
        await trio.to_thread.run_sync(
            check_contribution, self._plan, contribution, abandon_on_cancel=True
        )

    async def aggregate(self, number: int, selectors: Sequence[str]) -> AggregationResult:
        """Average ``selectors``' aggregates into the checkpoint of round ``number``.

        Write-ahead: the checkpoint is replaced only once the journal says the
        round is aggregating, so a restart can always tell whether a new
        checkpoint belongs to a round. If the caller is cancelled (shutdown),
        the worker thread is told to stop at its next slab and the checkpoint
        is left as it was.
        """
        unwritten = await self.journal.settled()
        if unwritten is not None:
            raise AggregationError(f"{unwritten}; the global checkpoint is kept as it was")
        contributions = [self._contribution(s) for s in selectors]

        async def attempt() -> AggregationResult:
            stop = threading.Event()

            def job() -> AggregationResult:
                result = self._aggregator(
                    self.layout.checkpoint, contributions, self.layout.tmp, stop
                )
                keep_in_history(self.layout, number, self._keep)
                return result

            try:
                return await trio.to_thread.run_sync(job, abandon_on_cancel=True)
            finally:
                stop.set()

        # Another process may hold the global checkpoint locked: wait for it,
        # within the reporting window; it is never a selector's fault.
        return await retry_while_locked(attempt, self._lock_patience)
