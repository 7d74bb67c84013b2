"""Lines a peer can repeat at will: the first, then one count per interval."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from fl_coordinator.log_throttle import Throttle
from fl_coordinator.logs import log_context


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logger(caplog: pytest.LogCaptureFixture) -> logging.Logger:
    caplog.set_level(logging.DEBUG, logger="throttled")
    return logging.getLogger("throttled")


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_repeats_within_the_interval_are_counted_then_written_once(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    throttle = Throttle(logger, 60, clock=clock)
    for attempt in range(30_000):
        throttle.warning("TLS handshake failed", "TLS handshake with %s failed", attempt,
                         peer="10.0.0.7:5000")  # fmt: skip
    assert messages(caplog) == ["TLS handshake with 0 failed"]
    clock.now = 61
    throttle.flush()
    assert messages(caplog)[1:] == [
        "... and 29999 more from 10.0.0.7 in the last 60 s: TLS handshake failed"
    ]
    throttle.warning("TLS handshake failed", "again", peer="10.0.0.7:6000")
    assert messages(caplog)[-1] == "again"  # a new interval


def test_peers_are_hosts_and_kinds_are_separate(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    throttle = Throttle(logger, 60, clock=Clock())
    throttle.warning("refused", "a", peer="10.0.0.7:1")
    throttle.warning("refused", "b", peer="10.0.0.7:2")  # same host, another port
    throttle.warning("refused", "c", peer="10.0.0.8:1")
    throttle.warning("too large", "d", peer="10.0.0.7:1")
    with log_context(peer="10.0.0.9:4"):
        throttle.warning("refused", "e")  # the peer of the log context
        throttle.warning("refused", "f")
    assert messages(caplog) == ["a", "c", "d", "e"]


def test_the_table_of_peers_is_bounded(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    throttle = Throttle(logger, 60, max_entries=4, clock=Clock())
    for host in range(1000):
        throttle.warning("refused", "refused %d", host, peer=f"10.0.{host // 256}.{host % 256}:1")
    assert messages(caplog) == ["refused 0", "refused 1", "refused 2", "refused 3", "refused 4"]
    throttle.flush(everything=True)
    assert messages(caplog)[-1] == "... and 995 more from other peers in the last 60 s: refused"


async def test_run_writes_the_counts_as_intervals_end_and_when_cancelled(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    throttle = Throttle(logger, 60, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(throttle.run)
        for _ in range(3):
            throttle.warning("refused", "refused", peer="")
        await trio.sleep(121)
        assert messages(caplog) == ["refused", "... and 2 more in the last 60 s: refused"]
        throttle.warning("refused", "refused", peer="")
        throttle.warning("refused", "refused", peer="")
        nursery.cancel_scope.cancel()
    assert messages(caplog)[-1] == "... and 1 more in the last 60 s: refused"
