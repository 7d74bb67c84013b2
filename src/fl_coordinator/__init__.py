"""fl-coordinator: the coordinator of a hierarchical federated-learning system, on trio.

An embedding program needs little more than this::

    settings, unknown_keys = fl_coordinator.load_settings({"FL_ROOT_PATH": "/data"})
    await fl_coordinator.serve(settings)   # until cancelled; OperatorError if it cannot start

General layout (read in this order, as trio's own ``__init__`` suggests for trio):

* ``core/`` is the round, sans-I/O: ``stages.py`` holds every legal move as a
  table (as h11's ``_state.py``), ``events.py`` what the machine takes and asks
  for, ``rounds.py`` the machine; ``strategy.py`` the server strategies'
  arithmetic, ``stopping.py`` when a run ends. No trio, no files, no sockets.
* ``coordinator.py`` is the one task that owns the round: it feeds the machine
  events from a memory channel and carries out its effects with the I/O it is
  handed. ``app.py`` is the composition root: it turns ``Settings`` into the
  small values each part needs and runs everything in one nursery.
  ``evaluation.py`` runs ``EVALUATE``'s function in a worker process of its own.
* ``rpc/`` is everything that speaks gRPC: the listener, the selector-facing
  servicers, the ``GoalCountReached`` client, the health service, tokens, TLS
  and selector addresses.
* ``status/`` is what the coordinator tells the world: the status message
  schema and the hub that fans it out, the websocket, the webhook, the
  legacy ``FlStatus`` push to the Go system's webserver, metrics.
* ``storage/`` is the problem folder: its layout, atomic writes, the journal
  and history, the aggregation (FedAvg or the configured strategy over HDF5)
  and the optimizer's state, start-up checks and the built-in model.
* ``cli/`` holds the commands and the client tools (``watch``, the health
  probe). Each command imports only what it runs.
* ``config.py``, ``errors.py`` (one exception tree), ``retry.py`` and
  ``logs.py`` are shared by all of the above.
* ``federation/`` is not the coordinator: the reference selector and client
  and the local demo, which speak the same wire contract. ``_proto/`` is
  generated code.

Importing this package loads only its exceptions: every other public name
(the settings, the status schema, :func:`serve`) loads on its first use. The
``fl-coordinator`` command imports this package before it can turn a Ctrl-C
into one line (see :mod:`.cli.exits`); the settings alone (YAML, the events
and the schema) took 0.1 s, a window in which a Ctrl-C was a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    AggregationError,
    BadAddress,
    CheckpointError,
    CheckpointLocked,
    ChildFailed,
    CommandFailed,
    ConfigError,
    ContributionError,
    ContributionsRefused,
    DemoError,
    FederationError,
    FLError,
    GaveUp,
    HealthError,
    InputError,
    InvalidSelectorId,
    ListenError,
    MissingExtra,
    OperatorError,
    OutOfResources,
    PeerError,
    ProblemError,
    ShuttingDown,
    WatchError,
)

if TYPE_CHECKING:
    from .app import Endpoints, serve
    from .config import Settings, default_settings, load_settings, read_config_file
    from .core.stages import Stage
    from .status.schema import StatusMessage

__version__ = "0.1.0"

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
    "Endpoints",
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
    "Settings",
    "ShuttingDown",
    "Stage",
    "StatusMessage",
    "WatchError",
    "default_settings",
    "load_settings",
    "read_config_file",
    "serve",
]

#: Names loaded on first use, and their module: the server brings in trio, purerpc, h5py
#: and the rest; the settings YAML and, with the status schema, the round's events.
_LAZY = {
    "serve": "app",
    "Endpoints": "app",
    "Settings": "config",
    "default_settings": "config",
    "load_settings": "config",
    "read_config_file": "config",
    "Stage": "core.stages",
    "StatusMessage": "status.schema",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the ones not loaded yet included (as ``from ... import *`` sees)."""
    return sorted(set(globals()) | set(__all__))
