"""Server-side evaluation: ``EVALUATE``'s function, in a worker process, after each completed round.

``EVALUATE=package.module:function`` names a function the coordinator calls
as ``function(checkpoint_path, model_path, round) -> dict[str, float]`` once a
round has completed: ``checkpoint_path`` is that round's global checkpoint
(a hard link named ``*.weights.h5``, which Keras' ``load_weights`` takes as
it is), ``model_path`` the problem's ``initFiles/model.h5``. The function
typically loads the model with Keras and measures it on held-out data; the
package ships one for the demo's digits
(``fl_coordinator.federation.evaluation:digits``).

It runs in a worker **process** of its own, never in the coordinator's: the
function imports what it likes (Keras, JAX) without the coordinator ever
loading it, and whatever it does costs at most that round's metrics:

* a function that raises gives no metrics for that round (logged);
* one that does not return within ``EVALUATE_TIMEOUT`` seconds is killed
  with its process;
* one that kills its process (a crash, ``os._exit``, the kernel's OOM
  killer) costs the same, and the next evaluation gets a new process.

Evaluations run one at a time, in the order of their rounds, off the
round's path: the next round opens as soon as a round completes. At most
:data:`MAX_WAITING` wait for their turn (each keeps its round's checkpoint
on disk); beyond that the oldest waiting one is skipped, said in the log.
The function is imported once at start-up, in the worker, so a mistyped
``EVALUATE`` stops ``serve`` before it starts; the round task then evaluates
the checkpoint in place, if its metrics are not known yet (the initial
model's, on a new problem), which also warms the worker up (a first
prediction compiles) before the first round completes.

What the function returns is checked in the worker: a mapping of metric
names (``[A-Za-z_][A-Za-z0-9_]*``, at most 64 characters, so that each can be
a Prometheus gauge) to finite numbers, at most :data:`MAX_METRICS` of them;
anything else is dropped and said in the log.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import numbers
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import trio
import trio_parallel

from .core.stopping import METRIC_NAME
from .errors import ConfigError
from .storage.untrusted import clip
from .workers import worker_processes

__all__ = ["MAX_METRICS", "MAX_WAITING", "Evaluator"]

log = logging.getLogger(__name__)

#: Metrics kept of one evaluation.
MAX_METRICS = 32

#: Evaluations waiting for their turn, at most (the oldest is skipped for a new one).
MAX_WAITING = 4

#: How long the worker process gets to end when the coordinator stops.
_GRACE_SECONDS = 2.0

#: The function, once imported, in a worker process.
_resolved: dict[str, Callable[..., Any]] = {}


def _resolve(function: str) -> Callable[..., Any]:
    """In the worker: the function ``package.module:name`` names, imported once."""
    if function not in _resolved:
        module, _, name = function.partition(":")
        found = getattr(importlib.import_module(module), name)
        if not callable(found):
            raise TypeError(f"{name} in {module} is a {type(found).__name__}, not a function")
        _resolved[function] = found
    return _resolved[function]


def _prepare(function: str) -> str | None:
    """In the worker, at start-up: import the function; why it cannot be, if it cannot.

    Nothing of the user's module travels back to the coordinator, not even an
    exception (unpickling one of its classes would import that module there).
    """
    try:
        _resolve(function)
    except BaseException as error:
        return clip(f"{type(error).__name__}: {error}")
    return None


def _checked(result: object) -> tuple[dict[str, float], list[str]] | str:
    """The metrics of ``result`` that can be kept, and what was wrong with the others."""
    if not isinstance(result, Mapping):
        return f"it returned {type(result).__name__}, not a dict of metrics"
    metrics: dict[str, float] = {}
    dropped: list[str] = []
    for name, value in result.items():
        shown = clip(repr(name), 80)
        if not isinstance(name, str) or not METRIC_NAME.fullmatch(name):
            dropped.append(f"{shown}: not a metric name ([A-Za-z_][A-Za-z0-9_]*, <= 64)")
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            dropped.append(f"{shown}: {type(value).__name__}, not a number")
        elif not math.isfinite(float(value)):
            dropped.append(f"{shown}: {float(value)} is not finite")
        elif len(metrics) == MAX_METRICS:
            dropped.append(f"{shown}: more than {MAX_METRICS} metrics")
        else:
            metrics[str(name)] = float(value)  # plain types: nothing of the module travels
    return metrics, dropped[:5]


def _evaluate(
    function: str, checkpoint: Path, model: Path, number: int
) -> tuple[dict[str, float], list[str]] | str:
    """In the worker: call the function; its metrics, or why there are none."""
    try:
        result = _resolve(function)(checkpoint, model, number)
    except BaseException as error:  # SystemExit too: the process must go on serving
        return clip(f"{function} raised {type(error).__name__}: {error}")
    return _checked(result)


class Evaluator:
    """Runs ``function`` (``package.module:name``) on each completed round's checkpoint.

    ``model`` is the problem's model file, ``timeout`` the seconds one
    evaluation may take. Use :meth:`running`, then :meth:`evaluate`.
    """

    def __init__(self, function: str, model: Path, timeout: float) -> None:
        self.function = function
        self._model = model
        self._timeout = timeout
        self._turn = trio.Lock()  # one evaluation at a time, first come first served
        self._waiting: dict[int, trio.CancelScope] = {}  # by round, in order of arrival
        self._context: trio_parallel.WorkerContext | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The worker process lives inside; the function is imported before it yields.

        Raises ConfigError if the function cannot be imported within the timeout.
        The worker is forked from multiprocessing's fork server, as the file
        checks' are (see :mod:`.workers`).
        """
        try:
            async with worker_processes(
                "the evaluation's worker process", grace_period=_GRACE_SECONDS
            ) as self._context:
                await self._prepare()
                yield
        finally:
            self._context = None

    async def _prepare(self) -> None:
        assert self._context is not None
        why = f"its import did not finish within {self._timeout:g} s (EVALUATE_TIMEOUT)"
        with trio.move_on_after(self._timeout):
            try:
                why = await self._context.run_sync(_prepare, self.function, kill_on_cancel=True)
            except trio_parallel.BrokenWorkerError as error:
                why = f"its import ended the worker process ({error})"
            if why is None:
                log.info("EVALUATE=%s: imported in its worker process", self.function)
                return
        raise ConfigError(
            "EVALUATE", self.function, f"a function the worker process can import ({clip(why)})"
        )

    async def evaluate(self, number: int, checkpoint: Path) -> dict[str, float] | str:
        """The metrics of round ``number``'s ``checkpoint``, or why there are none."""
        waiting = self._waiting[number] = trio.CancelScope()
        if len(self._waiting) > MAX_WAITING:
            self._waiting.pop(next(iter(self._waiting))).cancel()
        with waiting:
            async with self._turn:
                del self._waiting[number]
                return await self._timed(number, checkpoint)
        return f"skipped: {MAX_WAITING} later rounds were waiting for their evaluation"

    async def _timed(self, number: int, checkpoint: Path) -> dict[str, float] | str:
        with trio.move_on_after(self._timeout):
            outcome = await self._run(number, checkpoint)
            if isinstance(outcome, str):
                return outcome
            metrics, dropped = outcome
            for problem in dropped:
                log.warning("round %d: metric %s dropped", number, problem)
            return metrics
        return (
            f"the evaluation did not finish within {self._timeout:g} s (EVALUATE_TIMEOUT); "
            "its worker process was killed"
        )

    async def _run(self, number: int, checkpoint: Path) -> tuple[dict[str, float], list[str]] | str:
        assert self._context is not None, "use evaluate() inside running()"
        try:
            return await self._context.run_sync(
                _evaluate, self.function, checkpoint, self._model, number, kill_on_cancel=True
            )
        except trio_parallel.BrokenWorkerError as error:
            code = getattr(error.args[-1], "exitcode", None)
            return f"the evaluation ended its worker process (exit {code})"
