"""The one retry policy (GoalCountReached, webhook, legacy push): waits, jitter, giving up."""

from __future__ import annotations

import logging

import pytest
import trio

from fl_coordinator.retry import RetryPolicy


class Flaky:
    """Fails ``failures`` times with ``error``, then answers 42; records when it was called."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.times: list[float] = []

    async def __call__(self) -> int:
        self.times.append(trio.current_time())
        if len(self.times) <= self.failures:
            raise self.error
        return 42


async def test_waits_double_with_bounded_jitter_then_the_call_succeeds(
    autojump_clock, caplog: pytest.LogCaptureFixture
) -> None:
    job = Flaky(failures=3, error=ConnectionError("refused"))
    policy = RetryPolicy(attempts=4, first_wait=1.0, jitter=0.5)
    with caplog.at_level(logging.WARNING, logger="fl_coordinator.retry"):
        assert await policy.call(job, on=ConnectionError, what="call to x") == 42
    waits = [later - earlier for earlier, later in zip(job.times, job.times[1:], strict=False)]
    for wait, base in zip(waits, (1.0, 2.0, 4.0), strict=True):
        assert base <= wait <= base + 0.5, waits
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("call to x failed (refused); retry 1 in ")


async def test_the_last_error_is_raised_when_attempts_are_used_up(autojump_clock) -> None:
    job = Flaky(failures=10, error=TimeoutError("no answer within 10 s"))
    policy = RetryPolicy(attempts=3, first_wait=1.0, jitter=0.0)
    with pytest.raises(TimeoutError, match="no answer within 10 s"):
        await policy.call(job, on=TimeoutError, what="x")
    assert [round(t - job.times[0], 6) for t in job.times] == [0.0, 1.0, 3.0]


async def test_other_errors_are_not_retried(autojump_clock) -> None:
    job = Flaky(failures=10, error=ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        await RetryPolicy(attempts=5).call(job, on=ConnectionError, what="x")
    assert len(job.times) == 1


def test_at_least_one_attempt() -> None:
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        RetryPolicy(attempts=0)


async def test_without_a_limit_it_tries_until_the_call_succeeds(autojump_clock) -> None:
    job = Flaky(failures=30, error=ConnectionError("refused"))
    policy = RetryPolicy(attempts=None, first_wait=0.5, max_wait=60.0, jitter=0.0)
    assert await policy.call(job, on=ConnectionError, what="x") == 42
    waits = [round(b - a, 6) for a, b in zip(job.times, job.times[1:], strict=False)]
    assert waits[:8] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]
    assert len(waits) == 30 and set(waits[7:]) == {60.0}
