"""Run a program's main task until it ends or SIGINT/SIGTERM arrives, then stop cleanly."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio

from ..errors import OperatorError, first_of

__all__ = ["run_main", "run_until_signal"]

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


def run_main(main: Callable[[], Awaitable[object]]) -> None:
    """``trio.run`` ``main`` until it ends or a signal; raise the OperatorError it raised.

    Errors an operator can act on (a bad setting, an unreachable peer) leave
    the nursery wrapped in an exception group; command-line entry points want
    the one error, to print as one line. Anything else is raised as it is.
    """
    try:
        trio.run(run_until_signal, main)
    except BaseExceptionGroup as group:
        error = first_of(group, OperatorError)
        if error is None:
            raise
        raise error from None
