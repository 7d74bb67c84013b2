"""Every exception fl-coordinator raises on purpose, in one tree.

Catch at the level you care about: a program embedding the coordinator
catches :class:`OperatorError` around :func:`fl_coordinator.serve` and shows
``str(error)`` (one line: what, which value, what to do); the command line
does exactly that, once, and exits with the error's ``exit_status``. Errors
about untrusted input are values at the edges: the coordinator turns them
into a refused call or a rejected selector, never into a crash. The tree
(as httpx's ``_exceptions.py`` draws its own)::

    FLError
    ├── OperatorError ............ an operator can fix it; exit status 2
    │   ├── ConfigError .......... a setting or flag that cannot be used (key, value, expected)
    │   ├── ListenError .......... a port or address that cannot be listened on (busy,
    │   │                          an address not of this machine or that does not resolve)
    │   ├── ProblemError ......... the problem folder cannot be initialised, read or rolled back
    │   ├── MissingExtra ......... an optional part (Keras, for init) is not installed here
    │   ├── PeerError ............ a reference selector's or client's peer cannot be used as
    │   │   │                      set up (address, token, TLS); exit status 2, or 1 if it is gone
    │   │   └── GaveUp ........... a client was refused more often than it may retry; exit 1
    │   └── CommandFailed ........ a client tool could not do its job; exit status 1
    │       ├── WatchError ....... ``fl-coordinator watch``: the stream cannot be followed
    │       ├── HealthError ...... ``fl-coordinator health``: the health service cannot be asked
    │       └── DemoError ........ ``fl-coordinator demo`` did not finish
    ├── InputError (ValueError) .. untrusted input refused at the edge, with the reason
    │   ├── InvalidSelectorId .... an id that is not a safe folder name
    │   └── BadAddress ........... an id or address that is not ``host:port``
    ├── AggregationError ......... an average could not be computed; the checkpoint is untouched
    │   ├── CheckpointError ...... ...because of the global checkpoint (never a selector's fault)
    │   │   └── CheckpointLocked . ...another process holds it locked; worth waiting for
    │   ├── ContributionError .... a selector's files cannot be used: it alone is rejected
    │   ├── ContributionsRefused . files refused while averaging (changed since their check)
    │   ├── OutOfResources ....... a check could not run: the coordinator is out of its own
    │   │                          descriptors or memory (never a selector's fault)
    │   └── ShuttingDown ......... ...because the coordinator is stopping
    └── FederationError .......... the reference selector, client and demo processes
        └── ChildFailed .......... a process of a local federation ended or never became ready

Trio's own exceptions (``trio.Cancelled``) and programming errors are not
part of the tree: they are not meant to be caught by a caller. Nor is
:class:`.storage.untrusted.OwnShortage`, an OSError (EMFILE, ENOMEM, ...) that
marks the coordinator's own shortage as confirmed where a selector's file
failed to open: the storage modules tell it from the selector's file
system's answers, and it ends as OutOfResources or a CheckpointError.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import TypeVar

from .untrusted_text import shown

__all__ = [
    "AggregationError",
    "BadAddress",
    "CheckpointError",
    "CheckpointLocked",
    "ChildFailed",
    "CommandFailed",
    "ConfigError",
    "ContributionError",
    "ContributionsRefused",
    "DemoError",
    "FLError",
    "FederationError",
    "GaveUp",
    "HealthError",
    "InputError",
    "InvalidSelectorId",
    "ListenError",
    "MissingExtra",
    "OperatorError",
    "OutOfResources",
    "PeerError",
    "ProblemError",
    "ShuttingDown",
    "WatchError",
    "first_of",
    "os_error_text",
    "short_reason",
]


class FLError(Exception):
    """Base of every exception fl-coordinator raises on purpose."""


class OperatorError(FLError):
    """Something an operator can fix; ``str()`` is one line that says what to do.

    ``exit_status`` is what the command line exits with after printing it.
    """

    exit_status = 2


class ConfigError(OperatorError):
    """A configuration value (a key, or a command-line flag) that cannot be used."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        super().__init__(f"configuration error: {key}={value!r}: expected {expected}")
        self.key = key
        self.value = value
        self.expected = expected


class ListenError(OperatorError):
    """A port that cannot be listened on, or an address that cannot be listened at.

    ``key`` is the setting at fault: ``port_key`` (``PORT``, ``STATUS_PORT``,
    ``METRICS_PORT``: the one that chose the port), or ``HOST``, where every
    listener listens, when the address is the problem: a name that does not
    resolve (:class:`socket.gaierror`) or an address that is not this
    machine's (EADDRNOTAVAIL).
    """

    def __init__(self, port_key: str, host: str, port: int, error: OSError) -> None:
        key: str = port_key
        value: object = port
        if isinstance(error, socket.gaierror):
            key, value = "HOST", host
            reason = (
                "an address of this machine to listen at, or a name that resolves to one "
                f"(it does not: {error.strerror or error})"
            )
        elif error.errno == errno.EADDRNOTAVAIL:
            key, value = "HOST", host
            reason = (
                "an address of this machine to listen at, or 0.0.0.0 for all of them "
                f"(it is not one: {os.strerror(error.errno)})"
            )
        elif error.errno == errno.EADDRINUSE:
            reason = "a free port (address already in use: is another coordinator running?)"
        else:
            reason = f"a port we may listen on at {host!r} ({error.strerror or error})"
        super().__init__(f"configuration error: {key}={value!r}: expected {reason}")
        self.key = key
        self.host = host
        self.port = port


class ProblemError(OperatorError):
    """The problem folder cannot be initialised, read or rolled back as asked."""


class MissingExtra(OperatorError):
    """What was asked needs an optional extra of the package that is not installed.

    The slim image (and ``pip install fl-coordinator``) serves, probes, watches
    and rolls back without Keras; only preparing a problem and the reference
    client need it. The message names the pip command.
    """

    def __init__(self, needed_for: str, extra: str, error: ImportError) -> None:
        super().__init__(
            f"{needed_for} needs {error.name or 'a module'}, which is not installed here: "
            f"pip install 'fl-coordinator[{extra}]' (or use the full image)"
        )
        self.extra = extra


class PeerError(OperatorError):
    """The reference selector or client cannot work with its peer.

    The message says which peer, at which address, what happened and what to
    check (:func:`fl_coordinator.federation.call_errors.explain`). Exit status
    2 when a setting is wrong (a port that is not gRPC, a token or TLS
    refused), 1 when the peer cannot be reached (it may come back).
    """

    def __init__(self, message: str, exit_status: int = 2) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class GaveUp(PeerError):
    """The client was refused more often than it was allowed to retry (exit status 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 1)


class CommandFailed(OperatorError):
    """A client tool (``watch``, ``health``, ``demo``) could not do its job."""

    exit_status = 1


class WatchError(CommandFailed):
    """Why ``fl-coordinator watch`` stopped following the status stream."""


class HealthError(CommandFailed):
    """The health service could not be asked (unreachable, refused, unreadable TLS files)."""


class DemoError(CommandFailed):
    """The demo cannot run or did not finish; the message says why and where to look."""


class InputError(FLError, ValueError):
    """Untrusted input (from a peer, a selector's folder) refused at the edge."""


class InvalidSelectorId(InputError):
    """A selector id that is not a safe folder name (empty, too long, separators, controls)."""


class BadAddress(InputError):
    """A selector id or an address that cannot be dialed as ``host:port``."""


class AggregationError(FLError):
    """An average (or the check of one contribution) could not be computed.

    The message names the file and what is wrong with it; the global
    checkpoint is left as it was.
    """


class CheckpointError(AggregationError):
    """The global checkpoint itself cannot be averaged into, read or replaced.

    Its layout or dtypes are refused (see :mod:`.storage.weights`), it cannot
    be opened, or the new one cannot be written (a full or read-only disk).
    Never a selector's fault: no selector is rejected for it. At start-up and
    in ``init`` the same problems are reported as :class:`ProblemError`.
    """


class CheckpointLocked(CheckpointError):
    """Another process holds the global checkpoint locked (HDF5 file locking, errno 11)."""


class ContributionError(AggregationError):
    """A selector's files (its folder, aggregate or weight) cannot be used.

    The fault is the selector's: it alone is rejected, with this message (the
    file and what is wrong with it), and the round goes on without it. A
    problem with the global checkpoint is never raised as this.
    """


class ContributionsRefused(AggregationError):
    """Inputs of an average were refused while it ran: nothing was written.

    ``reasons`` maps each refused input (a selector id, or a path for
    :func:`~fl_coordinator.storage.aggregation.sum_into`) to why: for the
    coordinator, a file that changed after it passed its check. The caller
    drops them and may average the rest.
    """

    def __init__(self, reasons: dict[str, str]) -> None:
        super().__init__("; ".join(reasons.values()))
        self.reasons = reasons

    def __reduce__(self) -> tuple[type, tuple[dict[str, str]]]:
        return type(self), (self.reasons,)


class OutOfResources(AggregationError):
    """A selector's files could not be checked: the coordinator ran out of its own
    descriptors, memory or processes (errno EMFILE, ENFILE, ENOMEM, EAGAIN...), and
    still had none when it tried again.

    Never the selector's fault: no selector is rejected for it. The round
    fails (the global checkpoint is kept) with this message, which says what
    ran out and what to raise; the next round goes on.
    """


class ShuttingDown(AggregationError):
    """The coordinator is stopping: the aggregation was given up, the checkpoint kept."""


class FederationError(FLError):
    """A failure of the reference programs (selector, client, local federation)."""


class ChildFailed(FederationError):
    """A child process ended (or never became ready); the message quotes its log."""


#: The longest reason :func:`short_reason` gives.
_REASON_CHARS = 300


def short_reason(error: BaseException) -> str:
    """What went wrong, for a log line or the status stream: the first line, escaped and
    bounded (an error from a peer quotes what the peer sent)."""
    text = str(error).strip() or type(error).__name__
    return shown(text.splitlines()[0], _REASON_CHARS)


def os_error_text(error: OSError) -> str:
    """``error`` in one short line: ``[Errno 28] No space left on device``.

    HDF5's messages carry the same errno inside a paragraph of C details
    (buffer addresses, offsets); the errno is what an operator acts on.
    """
    if error.errno:
        return f"[Errno {error.errno}] {os.strerror(error.errno)}"
    return " ".join(str(error).split())[:_REASON_CHARS]


E = TypeVar("E", bound=BaseException)


def first_of(group: BaseExceptionGroup, kind: type[E]) -> E | None:
    """The first ``kind`` exception inside ``group`` (at any depth), if any.

    Trio's nurseries and purerpc's channels wrap what their tasks raise in
    exception groups; an entry point that wants one error to print as one
    line looks it up here.
    """
    matched, _ = group.split(kind)
    while isinstance(matched, BaseExceptionGroup):
        matched = matched.exceptions[0]
    return matched
