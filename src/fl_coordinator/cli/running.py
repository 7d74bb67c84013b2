"""Run a program's main task until it ends or SIGINT/SIGTERM arrives, then stop cleanly."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

log = logging.getLogger(__name__)


class _DropAfterShutdown(logging.Filter):
    """purerpc logs every connection it tears down on cancellation as a warning."""

    stopping = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.stopping


async def run_until_signal(main: Callable[[], Awaitable[object]]) -> None:
    """Run ``main`` until it returns or SIGINT/SIGTERM arrives, then stop every task."""
    quiet = _DropAfterShutdown()
    logging.getLogger("purerpc.server").addFilter(quiet)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def main_then_stop() -> None:
                await main()
                nursery.cancel_scope.cancel()

            nursery.start_soon(main_then_stop)

            async for signum in signals:
                log.info("%s received: shutting down", signal.Signals(signum).name)
                quiet.stopping = True
                nursery.cancel_scope.cancel()
                break


E = TypeVar("E", bound=BaseException)


def first_of(group: BaseExceptionGroup, kind: type[E]) -> E | None:
    """The first ``kind`` exception inside a nursery's exception group, if any."""
    matched, _ = group.split(kind)
    while isinstance(matched, BaseExceptionGroup):
        matched = matched.exceptions[0]
    return matched


def run_main(main: Callable[[], Awaitable[object]], expected: type[E]) -> E | None:
    """``trio.run`` ``main`` until it ends or a signal; return the ``expected`` error it raised.

    Errors an operator can act on (a bad setting, an unreachable peer) leave
    the nursery wrapped in an exception group; command-line entry points want
    the one error, to print as one line. Anything else is raised as it is.
    """
    try:
        trio.run(run_until_signal, main)
    except BaseExceptionGroup as group:
        error = first_of(group, expected)
        if error is None:
            raise
        return error
    return None
