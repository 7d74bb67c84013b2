"""The problem folder as the round task uses it: validate, aggregate, journal, off the event loop.

The round task (:mod:`fl_coordinator.coordinator`) is handed one
:class:`RoundFiles` by the composition root and never touches a path or a
file itself: every method here does its blocking work in a worker thread, so
the event loop keeps answering check-ins, the health service and the status
stream while HDF5 files are read and written.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Sequence

import trio

from ..errors import AggregationError, ContributionError
from .aggregation import AggregationResult, Aggregator, Contribution, aggregate
from .checker import ContributionChecker
from .checkpoint import retry_while_locked
from .contribution import CheckpointSpec
from .journal import keep_in_history
from .journal_writer import JournalWriter
from .layout import Layout
from .weights import Weight

__all__ = ["RoundFiles"]


class RoundFiles:
    """Blocking file work of one problem, as awaitables. Errors: AggregationError.

    ``plan`` is the global checkpoint's weight arrays (read at start-up), which
    every selector's files are validated against, in worker processes (see
    :mod:`.checker`: ``check_timeout`` seconds each, ``check_workers`` at
    once): a validation never opens the global checkpoint, so another
    process holding it locked is no selector's fault. What a validation
    found (the weight, the identity of the aggregate file) is what the
    aggregation of that round averages. ``aggregator`` is the averaging
    function run in a worker thread (tests and benchmarks pass a wrapped one
    to observe or pace it); after it succeeds the new checkpoint is kept in
    the history (``keep`` checkpoints). While another process holds the global
    checkpoint locked the aggregation waits up to ``lock_patience`` seconds
    (0: until it goes). :attr:`journal` is the round journal's one writer.
    Use inside :meth:`running`.
    """

    def __init__(
        self,
        layout: Layout,
        plan: Sequence[Weight],
        *,
        aggregator: Aggregator = aggregate,
        keep: int = 5,
        lock_patience: float = 0.0,
        check_timeout: float = 60.0,
        check_workers: int = 2,
    ) -> None:
        self.layout = layout
        self.journal = JournalWriter(layout)
        spec = CheckpointSpec(tuple(plan), layout.checkpoint.stat().st_size)
        self._checker = ContributionChecker(layout, spec, check_timeout, check_workers)
        self._checked: dict[tuple[int, str], Contribution] = {}
        self._aggregator = aggregator
        self._keep = keep
        self._lock_patience = lock_patience

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The validation's worker processes live inside (started before it yields)."""
        async with self._checker.running():
            yield

    async def warm(self) -> None:
        """Have the validation's workers ready (reports are coming: a round configures)."""
        await self._checker.warm()

    async def validate(self, number: int, selector: str) -> None:
        """Raise ContributionError unless ``selector``'s files can be averaged in round
        ``number``; remember what passed, for that round's aggregation."""
        outcome = await self._checker.check(selector)
        if isinstance(outcome, str):
            raise ContributionError(outcome)
        self._checked[(number, selector)] = outcome

    def forget_before(self, number: int) -> None:
        """Drop what the validations of rounds before ``number`` found."""
        for key in [key for key in self._checked if key[0] < number]:
            del self._checked[key]

    async def aggregate(self, number: int, selectors: Sequence[str]) -> AggregationResult:
        """Average ``selectors``' validated aggregates into the checkpoint of round ``number``.

        Write-ahead: the checkpoint is replaced only once the journal says the
        round is aggregating, so a restart can always tell whether a new
        checkpoint belongs to a round. ContributionsRefused names selectors
        whose files changed since their validation (nothing was written). If
        the caller is cancelled (shutdown), the worker thread is told to stop
        at its next slab and the checkpoint is left as it was.
        """
        unwritten = await self.journal.settled()
        if unwritten is not None:
            raise AggregationError(f"{unwritten}; the global checkpoint is kept as it was")
        contributions = [self._checked[(number, s)] for s in selectors]

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
