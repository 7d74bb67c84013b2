"""How a command ends: its exit status, and one line for what stopped it.

Light on purpose (no trio): :func:`exit_status` wraps everything a command
does, its imports included, so a Ctrl-C while it loads is one line too.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from ..errors import OperatorError

__all__ = ["INTERRUPTED", "exit_status"]


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
    the job as KeyboardInterrupt: one outside :func:`.running.run_until_signal` (while
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
