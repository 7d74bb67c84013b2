"""The problem folder as the round task uses it: validate, aggregate, journal, off the event loop.

The round task (:mod:`fl_coordinator.coordinator`) is handed one
:class:`RoundFiles` by the composition root and never touches a path or a
file itself: every method here does its blocking work in a worker thread, so
the event loop keeps answering check-ins, the health service and the status
stream while HDF5 files are read and written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import trio

from ..core.privacy import Spent
from ..core.strategy import Strategy
from ..errors import AggregationError, ContributionError, ContributionsRefused, os_error_text
from .aggregation import AggregationResult, Aggregator, Contribution, ServerUpdate, aggregate
from .atomic import write_atomic
from .checker import ContributionChecker
from .checkpoint import retry_while_locked
from .contribution import CheckpointSpec
from .journal import checkpoint_round, keep_in_history, kept_file
from .journal_writer import JournalWriter
from .layout import Layout
from .pass_control import PassControl, held_in_hdf5
from .privacy_ledger import PrivacyLedger
from .strategy_state import StateUpdate, state_path
from .weights import Weight

__all__ = ["METRICS_SUFFIX", "RoundFiles", "canceller", "kept_metrics"]

#: A kept round's evaluated metrics: ``round-NNNNNN`` + this, in the history.
METRICS_SUFFIX = ".metrics.json"

log = logging.getLogger(__name__)


def kept_metrics(layout: Layout, number: int) -> str:
    """The metrics kept for round ``number``, for a person: ``"  (accuracy 0.93)"`` or ``""``."""
    try:
        metrics = json.loads(kept_file(layout, number, METRICS_SUFFIX).read_text())["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    shown = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
    return f"  ({shown})"


def _stuck(
    control: PassControl, contributions: Sequence[Contribution], limit: float
) -> ContributionsRefused | AggregationError:
    """What to raise for a pass given up while it waited on ``control.stuck``'s storage:
    that selector refused, or (a file of the coordinator's own) the pass failed."""
    stuck = control.stuck
    assert stuck is not None  # only the watchdog cancels the pass's scope
    said = f"did not answer within {limit:g} s (CHECK_TIMEOUT) while it was being averaged"
    for contribution in contributions:
        if contribution.checkpoint.path == stuck.path:
            return ContributionsRefused(
                {contribution.selector: f"{stuck.path}: its storage {said}; abandoned (check "
                 "the storage that serves this folder)"}
            )  # fmt: skip
    return AggregationError(
        f"{stuck.path}: the coordinator's own storage {said}; the global checkpoint is kept "
        "as it was"
    )


def canceller(scope: trio.CancelScope) -> Callable[[], None]:
    """A function any thread may call to cancel ``scope`` (in the current trio run); once
    that run has ended there is nothing left to cancel, and it does nothing."""
    token = trio.lowlevel.current_trio_token()

    def cancel() -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the watchdog lost the race
            token.run_sync_soon(scope.cancel)

    return cancel


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
    ``strategy`` is what each aggregation computes; ``state`` is the optimizer
    state the next one starts from (None: the initial one; see
    :mod:`.strategy_state`), then each round's own. ``evaluated``: keep each new
    checkpoint for its evaluation (:meth:`evaluation_copy`). ``privacy``: the
    ledger of rounds released under differential privacy (None: DP is off),
    which each aggregation is recorded in before it starts. Use inside
    :meth:`running`.
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
        strategy: Strategy | None = None,
        state: Path | None = None,
        evaluated: bool = False,
        privacy: PrivacyLedger | None = None,
    ) -> None:
        self.layout = layout
        self.journal = JournalWriter(layout)
        self._strategy = strategy or Strategy()
        self._state = state
        self._evaluated = evaluated
        self._privacy = privacy
        spec = CheckpointSpec(
            tuple(plan),
            layout.checkpoint.stat().st_size,
            measure_norms=self._strategy.combination.clip_norm > 0 or privacy is not None,
        )
        self._checker = ContributionChecker(layout, spec, check_timeout, check_workers)
        self._wait_limit = check_timeout
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

    async def validate(self, number: int, selector: str) -> Contribution:
        """Raise ContributionError unless ``selector``'s files can be averaged in round
        ``number``; remember what passed, for that round's aggregation, and return it."""
        outcome = await self._checker.check(selector)
        if isinstance(outcome, str):
            raise ContributionError(outcome)
        self._checked[(number, selector)] = outcome
        return outcome

    async def privacy_spent(self) -> Spent | None:
        """What the rounds released under differential privacy spent (None: DP is off)."""
        ledger = self._privacy
        return None if ledger is None else await trio.to_thread.run_sync(ledger.spent)

    def forget_before(self, number: int) -> None:
        """Drop what the validations of rounds before ``number`` found."""
        for key in [key for key in self._checked if key[0] < number]:
            del self._checked[key]

    async def aggregate(self, number: int, selectors: Sequence[str]) -> AggregationResult:
        """Average ``selectors``' validated aggregates into the checkpoint of round ``number``.

        Write-ahead: the checkpoint is replaced only once the journal says the
        round is aggregating, so a restart can always tell whether a new
        checkpoint belongs to a round. ContributionsRefused names selectors
        whose files changed since their validation, or whose storage did not
        answer one of the pass's calls within ``check_timeout`` (the pass is
        then given up, its thread left to end when that storage answers: see
        :mod:`.pass_control`; nothing was written). If the caller is
        cancelled (shutdown), the worker thread is told to stop at its next
        slab and the checkpoint is left as it was, unless it was being
        replaced already.
        """
        unwritten = await self.journal.settled()
        if unwritten is not None:
            raise AggregationError(f"{unwritten}; the global checkpoint is kept as it was")
        if (held := held_in_hdf5()) is not None:
            raise AggregationError(
                f"an earlier averaging pass is still waiting on {held.path}, inside HDF5, "
                f"for {time.monotonic() - held.since:.0f} s: HDF5 serves one call at a time "
                "in this process, so nothing can be averaged until that storage answers; "
                "abort its mount (FUSE: stop its server, or write 1 to "
                "/sys/fs/fuse/connections/N/abort; NFS: umount -f): umount -l does not end "
                "a call in flight, nor can any process end while it waits on FUSE; the "
                "global checkpoint is kept as it was"
            )
        if self._privacy is not None:
            await self._record_release(self._privacy, number)
        contributions = [self._checked[(number, s)] for s in selectors]
        optimizer = self._strategy.optimizer
        state = (
            StateUpdate(optimizer, self._state, state_path(self.layout, number), number)
            if optimizer.moments
            else None
        )
        update = ServerUpdate(self._strategy, state)

        async def attempt() -> AggregationResult:
            control = PassControl()

            def job() -> AggregationResult:
                try:
                    result = self._aggregator(
                        self.layout.checkpoint, contributions, self.layout.tmp, control, update
                    )
                finally:
                    control.ended()
                keep_in_history(self.layout, number, self._keep)
                if self._evaluated:
                    self._keep_for_evaluation(number)
                return result

            scope = trio.CancelScope()
            try:
                with scope, control.watched(self._wait_limit, canceller(scope)):
                    return await trio.to_thread.run_sync(job, abandon_on_cancel=True)
            except Exception:
                if control.stuck is None:
                    raise  # else it ended as it was given up: ShuttingDown, or what it met
            finally:
                control.left()  # remembered if its thread still runs
            raise _stuck(control, contributions, self._wait_limit)

        # Another process may hold the global checkpoint locked: wait for it,
        # within the reporting window; it is never a selector's fault.
        result = await retry_while_locked(attempt, self._lock_patience)
        if state is not None:
            self._state = state.dest  # the next round goes on from this round's state
        return result

    async def _record_release(self, ledger: PrivacyLedger, number: int) -> None:
        """Write ahead that round ``number`` is released (nothing is averaged otherwise)."""
        try:
            await trio.to_thread.run_sync(ledger.record, number)
        except OSError as error:
            raise AggregationError(
                f"cannot record round {number} in the privacy ledger ({os_error_text(error)}); "
                "the global checkpoint is kept as it was"
            ) from None

    def evaluation_copy(self, number: int) -> Path:
        """Where round ``number``'s checkpoint is kept for its evaluation (a hard link, made
        as the round completes, so a later round cannot replace it first; in ``tmp/``, so
        a restart removes what an evaluation did not). Named ``*.weights.h5``: Keras loads
        weights only from such names."""
        return self.layout.tmp / f"evaluate-round-{number:06d}.weights.h5"

    async def keep_current_for_evaluation(self) -> int | None:
        """Keep the checkpoint in place for an evaluation: the round that produced it (None:
        the history does not know it, or it cannot be kept)."""

        def keep() -> int | None:
            number = checkpoint_round(self.layout)
            return number if number is not None and self._keep_for_evaluation(number) else None

        return await trio.to_thread.run_sync(keep)

    async def evaluated(self, number: int, metrics: dict[str, float] | None) -> None:
        """Round ``number``'s evaluation ended: keep its ``metrics`` beside its checkpoint
        in the history (if it is still kept), and remove the checkpoint's copy."""

        def tidy() -> None:
            if metrics is not None and kept_file(self.layout, number).exists():
                text = json.dumps({"round": number, "metrics": metrics}, indent=1)
                try:
                    write_atomic(
                        kept_file(self.layout, number, METRICS_SUFFIX),
                        text.encode(),
                        self.layout.tmp,
                    )
                except OSError as error:
                    log.error("round %d: cannot keep its metrics in the history (%s)", number,
                              os_error_text(error))  # fmt: skip
            self.evaluation_copy(number).unlink(missing_ok=True)

        await trio.to_thread.run_sync(tidy)

    def _keep_for_evaluation(self, number: int) -> bool:
        """In a worker thread: link the checkpoint in place for round ``number``'s evaluation."""
        copy = self.evaluation_copy(number)
        try:
            copy.unlink(missing_ok=True)
            os.link(self.layout.checkpoint, copy)
        except OSError as error:  # the round has completed: only its metrics are lost
            log.error("round %d: cannot keep its checkpoint for evaluation (%s)", number,
                      os_error_text(error))  # fmt: skip
            return False
        return True
