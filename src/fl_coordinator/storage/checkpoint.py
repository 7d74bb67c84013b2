"""The global checkpoint: opening it, and waiting while another process holds it locked.

HDF5 (1.10 and later) locks every file it opens. A process that holds
``initFiles/fl_checkpoint`` open for writing (h5py mode ``"a"``: an operator's
notebook, a script that patches the weights) makes every other open fail at
once with "unable to lock file, errno = 11". That is nobody's fault in the
round, least of all a selector's, and it usually passes: the aggregation
waits and tries again, for at most the round's reporting window, and only
then is the round abandoned, with an error that names the file and the lock.

Selectors' contributions are checked against the checkpoint's plan read at
start-up (:func:`read_checkpoint_plan`), so a lock on the global file never
touches them. On NFS, where HDF5's locks may not work at all, set
``HDF5_USE_FILE_LOCKING=FALSE`` (see the README).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

import trio

from ..errors import CheckpointError, CheckpointLocked, os_error_text
from .hdf5_fd import OwnFile, open_own
from .untrusted import OURS
from .weights import Weight, read_plan

__all__ = [
    "RETRY_FIRST",
    "RETRY_MAX",
    "open_checkpoint",
    "read_checkpoint_plan",
    "retry_while_locked",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Back-off between attempts to open a locked checkpoint, in seconds.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0


def open_checkpoint(path: Path, stack: ExitStack) -> OwnFile:
    """Open the checkpoint ``path`` read-only, closed with ``stack``: its HDF5 file, and
    the descriptor the averaging pass reads its plain arrays through.

    Opened through a descriptor of ours (:func:`.hdf5_fd.open_own`): a stalled ``open``
    or ``read`` (a hung mount) stops the calling thread only, never the event loop.
    Raises CheckpointLocked while another process holds it locked, and
    CheckpointError if it is missing or not HDF5, or the coordinator is out of
    descriptors or memory to open it (:data:`.untrusted.OURS`), which it says.
    """
    try:
        return stack.enter_context(open_own(path, "r"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: the checkpoint is missing") from None
    except BlockingIOError:
        raise CheckpointLocked(
            f"{path}: the checkpoint is locked by another process that has it open for "
            "writing (HDF5: unable to lock file, errno = 11)"
        ) from None
    except OSError as error:
        if error.errno in OURS:  # not the file's fault: an operator would look at the file
            raise CheckpointError(
                f"{path}: the checkpoint cannot be opened: the coordinator is out of its own "
                f"resources ({os_error_text(error)}); raise its RLIMIT_NOFILE or memory"
            ) from None
        raise CheckpointError(
            f"{path}: the checkpoint is not a readable HDF5 file ({error})"
        ) from None


def read_checkpoint_plan(path: Path) -> tuple[Weight, ...]:
    """The weight arrays of the checkpoint at ``path`` (see :func:`.weights.read_plan`)."""
    with ExitStack() as stack:
        return read_plan(open_checkpoint(path, stack).file, path)


async def retry_while_locked(attempt: Callable[[], Awaitable[T]], patience: float) -> T:
    """``await attempt()``, again with back-off while it raises CheckpointLocked.

    Gives up after ``patience`` seconds (0: no limit, until cancelled) and
    raises CheckpointLocked saying how long it waited.
    """
    deadline = trio.current_time() + patience if patience > 0 else math.inf
    delay = RETRY_FIRST
    waiting = False
    while True:
        try:
            return await attempt()
        except CheckpointLocked as error:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise CheckpointLocked(
                    f"{error}; gave up after waiting {patience:g} s (REPORTING_TIMEOUT). "
                    "On NFS, where locks may be stale, see HDF5_USE_FILE_LOCKING in the README"
                ) from None
            if not waiting:
                limit = f"up to {patience:g} s" if patience > 0 else "as long as it takes"
                log.warning("%s; trying again for %s", error, limit)
                waiting = True
            await trio.sleep(min(delay, remaining))
            delay = min(2 * delay, RETRY_MAX)
