"""Run a program's main task until it ends or SIGINT/SIGTERM arrives, then stop cleanly."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Awaitable, Callable

import trio

from ..errors import OperatorError, first_of

__all__ = ["INTERRUPTED", "exit_status", "run_main", "run_until_signal"]

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


#: The exit status of a command stopped by Ctrl-C where it could not stop cleanly (128 + SIGINT,
#: what a shell reports for a program that SIGINT ended).
INTERRUPTED = 128 + signal.SIGINT


def _only_interrupts(error: BaseException) -> bool:
    """Whether ``error`` is a KeyboardInterrupt, or a group holding nothing else."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(KeyboardInterrupt)[1] is None
    return isinstance(error, KeyboardInterrupt)


def exit_status(prog: str, job: Callable[[], int]) -> int:
    """Run a command's ``job``: its exit status, or that of the OperatorError it raised.

    The error is printed as one line, ``prog: what, which value, what to do``,
    never as a traceback: the one place every command line of the project
    turns an operator's mistake into a message. So is a Ctrl-C that reaches
    the job as KeyboardInterrupt: one outside :func:`run_until_signal` (while
    Keras loads, a config file is read), or a second one while it stops, which
    trio delivers once the first has been handled (exit status
    :data:`INTERRUPTED`).
    """
    try:
        return job()
    except OperatorError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return error.exit_status
    except (KeyboardInterrupt, BaseExceptionGroup) as error:
        if not _only_interrupts(error):
            raise
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED
