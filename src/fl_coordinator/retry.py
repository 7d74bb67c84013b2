"""One retry policy for every call the coordinator repeats: back-off that doubles, with jitter.

``GoalCountReached`` to a selector, the webhook's POSTs and the legacy
status push are retried the same way, by :class:`RetryPolicy`, on `stamina <https://stamina.hynek.me>`_
(which runs on trio, so waits are ``trio.sleep`` and tests can use trio's
virtual clock). The wait before retry *n* is ``first_wait * 2**(n-1)``, capped
at ``max_wait``, plus a random part of up to ``jitter`` seconds: when one
network hiccup fails the calls to many selectors at once, jitter spreads
their retries instead of sending them again in one burst.

stamina's retry hooks are process-wide settings; this module installs its
own, one log line per retry through :mod:`logging` (so the line carries the
round and selector of :func:`~fl_coordinator.logs.log_context`), instead of
stamina's defaults, which would also register a counter in
prometheus-client's global registry that the coordinator's metrics do not use.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import stamina
import stamina.instrumentation

from .errors import short_reason

__all__ = ["RetryOn", "RetryPolicy"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What to retry: exception classes, or a predicate on the exception.
RetryOn = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]


def _log_retry(details: stamina.instrumentation.RetryDetails) -> None:
    log.warning(
        "%s failed (%s); retry %d in %.1f s",
        details.name,
        short_reason(details.caused_by),
        details.retry_num,
        details.wait_for,
    )


stamina.instrumentation.set_on_retry_hooks([_log_retry])


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` in all (>= 1), waits in seconds between them.

    ``attempts=None`` tries until the call succeeds or fails with something
    not retried: for a caller whose job can give up by itself (the legacy
    status push stops trying a stage change once its bounded queue dropped it).
    """

    attempts: int | None = 3
    first_wait: float = 1.0
    max_wait: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")

    async def call(self, job: Callable[[], Awaitable[T]], *, on: RetryOn, what: str) -> T:
        """``await job()`` until it succeeds or fails with something ``on`` does not match.

        Raises the last error once ``attempts`` are used up (never with
        ``attempts=None``: then only an error ``on`` does not match ends it). ``what`` names the
        call in the log line of each retry.

        The first attempt runs outside stamina: its retry context costs about
        0.1 ms to enter, and a round of N selectors makes N such calls, nearly
        all succeeding at once (``scripts/bench --parts round``). A first
        failure is raised again as the context's first attempt, so what stamina
        decides (to retry or not, the wait, the log line) is as if it had run it.
        """
        try:
            return await job()
        except Exception as error:
            failed: Exception | None = error
        attempts = stamina.retry_context(
            on=on,
            attempts=self.attempts,
            timeout=None,
            wait_initial=self.first_wait,
            wait_max=self.max_wait,
            wait_jitter=self.jitter,
        ).with_name(what, (), {})
        async for attempt in attempts:
            with attempt:
                if failed is not None:
                    error, failed = failed, None
                    raise error
                result = await job()
        return result
