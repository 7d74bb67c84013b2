"""Run a program's main task until it ends or SIGINT/SIGTERM arrives, then stop cleanly."""

from __future__ import annotations

import _thread
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator

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


@contextlib.contextmanager
def _interrupts_kept() -> Iterator[None]:
    """A KeyboardInterrupt that Python could not raise is raised again, at once.

    Python runs the SIGINT handler between two bytecodes of the main thread,
    and those may be a garbage collector callback's (JAX registers one, and
    runs it after its long C calls: Keras loading, building a model). Raised
    there, the KeyboardInterrupt is "unraisable": printed as "Exception
    ignored in ... KeyboardInterrupt", and the command carried on (``init``
    finished, exit status 0; the demo ran its rounds). The hook has the main
    thread interrupted again (as SIGINT does, through the handler in place:
    Python's or trio's), once out of that callback.
    """
    previous = sys.unraisablehook
    delivered = threading.Event()
    pending = False

    def deliver() -> None:  # in a thread of its own, once the hook has returned
        _thread.interrupt_main(signal.SIGINT)
        delivered.set()

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        nonlocal pending
        if not issubclass(unraisable.exc_type, KeyboardInterrupt):
            previous(unraisable)
            return
        pending = True
        delivered.clear()
        # Not waited for: the handler run in this hook would be as unraisable as in the
        # callback. (Another thread runs only once this one yields the GIL: after it.)
        try:
            _thread.start_new_thread(deliver, ())
        except KeyboardInterrupt:  # it came at once all the same: once more
            _thread.start_new_thread(deliver, ())

    sys.unraisablehook = hook
    try:
        yield
        if pending:
            delivered.wait()  # one that came as the job ended is raised here
    finally:
        sys.unraisablehook = previous


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
        with _interrupts_kept():
            return job()
    except OperatorError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return error.exit_status
    except (KeyboardInterrupt, BaseExceptionGroup) as error:
        if not _only_interrupts(error):
            raise
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED
