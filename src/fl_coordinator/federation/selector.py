"""The reference selector: holds clients, pre-aggregates their updates, reports to the coordinator.

It speaks the Go system's contract. Clients call ``FlRound.CheckIn`` and
``FlRound.Update``; the coordinator calls ``FLGoalCountBroadcast.GoalCountReached``;
the selector checks its clients in with the batched
``flcoordinator.v1.FlIntraBatch.CheckInClients`` (one call for all the clients
that arrived while the previous call was in flight; see checkin_batch.py) on
one connection it keeps (coordinator_link.py; the Go selector dials per call),
or with ``FlIntra.ClientCountUpdate`` once per client when the coordinator
does not serve the batched call (the Go one), or when told to (``batch_checkin``),
and calls ``FlIntra.SelectorAggregationComplete`` when its aggregate files are written.
Its id is its own ``host:port``, which also names its folder in shared storage.

A round, as one selector sees it, is a :class:`_Cohort`: the clients the
coordinator accepted, held until ``GoalCountReached``, then sent the files of
``initFiles/``, then expected to upload. Nothing hangs forever: a held client
is let go after ``hold_timeout``, and the cohort is aggregated with whatever
arrived after ``report_timeout`` (what was lost is logged).
"""

from __future__ import annotations

import functools
import itertools
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trio
from google.protobuf.message import Message
from purerpc.grpclib.exceptions import RpcFailedError
from purerpc.grpclib.status import StatusCode

from .._proto import (
    fl_intra_batch_grpc,
    fl_intra_batch_pb2,
    fl_intra_grpc,
    fl_intra_pb2,
    fl_round_grpc,
    fl_round_pb2,
)
from ..errors import first_of
from ..rpc.listener import serve_grpc
from ..storage.aggregation import AggregationError, sum_into
from ..storage.atomic import write_atomic
from ..storage.layout import Layout, check_selector_id
from ..storage.untrusted import UntrustedFile
from .checkin_batch import CheckInBatcher
from .coordinator_link import CoordinatorLink
from .transfer import file_chunks, integer, receive_upload

__all__ = ["Selector", "SelectorOptions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectorOptions:
    """How a selector is run (``fl-selector serve`` flags)."""

    coordinator: str
    layout: Layout
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str | None = None  # host in the id, when HOST is a wildcard
    waiting_time_ms: int = 20000
    hold_timeout: float = 300.0
    report_timeout: float = 300.0
    batch_checkin: bool = True  # False: one ClientCountUpdate per client, as the Go selector
    call_timeout: float = 60.0  # seconds for one call to the coordinator

    token: str = field(default="", repr=False)  # sent as `authorization: Bearer` to the coordinator
    coordinator_tls: ssl.SSLContext | None = None  # dial the coordinator over TLS
    server_tls: ssl.SSLContext | None = None  # serve (GoalCountReached, clients) over TLS


@dataclass
class _Cohort:
    """The clients of one round at this selector, and their uploads."""

    number: int
    asking: int = 0  # check-ins whose coordinator answer has not arrived yet
    held: int = 0
    configured: int = 0
    lost: int = 0
    uploads: list[tuple[Path, int]] = field(default_factory=list)
    go: trio.Event = field(default_factory=trio.Event)
    complete: trio.Event = field(default_factory=trio.Event)

    @property
    def expected(self) -> int:
        return self.configured - self.lost

    def check_complete(self) -> None:
        if self.go.is_set() and not self.asking and len(self.uploads) >= self.expected:
            self.complete.set()


def _sum_uploads(uploads: list[tuple[Path, int]], layout: Layout, selector_id: str) -> int:
    """Write ``fl_agg_checkpoint`` (sum of uploads) and its weight, atomically; return the weight.

    The same HDF5 walk as the coordinator's aggregation: every float dataset,
    float64 sums, written in each dataset's own dtype.
    """
    paths = [path for path, _ in uploads]
    weight = sum(n for _, n in uploads)

    def as_is(total: np.ndarray, _: np.ndarray, out: np.ndarray) -> None:
        np.copyto(out, total, casting="same_kind")

    inputs = [UntrustedFile.at(path) for path in paths]
    sum_into(paths[0], inputs, layout.agg_checkpoint(selector_id), layout.tmp, as_is)
    write_atomic(layout.agg_weight(selector_id), f"{weight}\n".encode(), layout.tmp)
    return weight


def _unimplemented(error: Exception) -> bool:
    """Did the coordinator answer UNIMPLEMENTED (possibly inside purerpc's exception group)?"""
    if isinstance(error, ExceptionGroup):
        error = first_of(error, RpcFailedError)
    if not isinstance(error, RpcFailedError):
        return False
    return error.status.status_code is StatusCode.UNIMPLEMENTED


class Selector(fl_round_grpc.FlRoundServicer, fl_intra_grpc.FLGoalCountBroadcastServicer):
    """One selector: its gRPC services, its current cohorts, its calls to the coordinator."""

    def __init__(self, options: SelectorOptions) -> None:
        self.options = options
        self.id = ""
        self._checked_in = 0
        self._numbers = itertools.count(1)
        self._uploads = itertools.count(1)
        self._selecting = _Cohort(next(self._numbers))
        self._reporting: _Cohort | None = None
        self._nursery: trio.Nursery | None = None
        self._batcher: CheckInBatcher | None = None
        self._link: CoordinatorLink | None = None
        self._batch_checkin = options.batch_checkin

    # -- wiring ---------------------------------------------------------------

    @property
    def folder(self) -> Path:
        return self.options.layout.selector_dir(self.id)

    @property
    def round_files(self) -> Path:
        return self.folder / "roundFiles"

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started`` gets the selector id."""
        # Both generated servicer bases define ``service``; build each one's explicitly.
        services = [
            fl_round_grpc.FlRoundServicer.service.fget(self),  # type: ignore[attr-defined]
            fl_intra_grpc.FLGoalCountBroadcastServicer.service.fget(self),  # type: ignore[attr-defined]
        ]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._batcher = CheckInBatcher(nursery, self._ask_for)
            self._link = CoordinatorLink(
                nursery, self.options.coordinator, self.options.coordinator_tls
            )
            serve = functools.partial(serve_grpc, ssl_context=self.options.server_tls)
            port = await nursery.start(serve, services, self.options.host, self.options.port)
            self.id = check_selector_id(f"{self.options.advertise or self.options.host}:{port}")
            self.round_files.mkdir(parents=True, exist_ok=True)
            log.info(
                "selector %s serving (coordinator %s, root %s)",
                self.id,
                self.options.coordinator,
                self.options.layout.root,
            )
            task_status.started(self.id)

    async def _call_coordinator(
        self, method: str, request: Message, stub: type = fl_intra_grpc.FlIntraStub
    ) -> Message:
        """One call on the connection shared by all calls (the Go selector dials per call)."""
        assert self._link is not None
        token = self.options.token
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        # purerpc waits forever on a connection the server dropped (a TLS or
        # size refusal): a time limit turns that into an error the caller handles.
        with trio.fail_after(self.options.call_timeout):
            return await self._link.call(stub, method, request, metadata)

    async def _ask_coordinator(self) -> bool:
        assert self._batcher is not None
        return await self._batcher.ask()

    async def _ask_for(self, clients: int) -> int:
        """How many of ``clients`` waiting clients the coordinator keeps (batched if it can)."""
        if self._batch_checkin:
            request = fl_intra_batch_pb2.ClientBatch(id=self.id, clients=clients)
            try:
                answer = await self._call_coordinator(
                    "CheckInClients", request, fl_intra_batch_grpc.FlIntraBatchStub
                )
            except Exception as error:
                if not _unimplemented(error):
                    raise
                log.info("the coordinator has no batched check-in; asking once per client")
                self._batch_checkin = False
            else:
                return answer.accepted
        accepted = 0

        async def ask_one() -> None:
            nonlocal accepted
            self._checked_in += 1
            request = fl_intra_pb2.ClientCount(count=self._checked_in, id=self.id)
            accepted += (await self._call_coordinator("ClientCountUpdate", request)).accepted

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(ask_one)
        return accepted

    async def _report(self, cohort: _Cohort) -> None:
        request = fl_intra_pb2.SelectorId(id=self.id)
        await self._call_coordinator("SelectorAggregationComplete", request)
        log.info("cohort %d: reported to the coordinator", cohort.number)

    # -- FlRound (clients) ------------------------------------------------------

    async def CheckIn(
        self, requests: AsyncIterator[fl_round_pb2.CheckInRequest]
    ) -> AsyncIterator[fl_round_pb2.FlData]:
        async for _ in requests:
            break
        # The client belongs to the cohort selecting when it asked: the
        # coordinator's GoalCountReached may overtake its own "accepted".
        cohort = self._selecting
        cohort.asking += 1
        try:
            accepted = await self._ask_coordinator()
        except Exception as error:
            log.warning("could not ask the coordinator about a client: %s", error)
            accepted = False
        finally:
            cohort.asking -= 1
        if accepted:
            cohort.held += 1
            if cohort.go.is_set():
                cohort.configured += 1
        cohort.check_complete()
        if not accepted:
            yield integer(self.options.waiting_time_ms)
            return
        with trio.move_on_after(self.options.hold_timeout):
            await cohort.go.wait()
        if not cohort.go.is_set():
            cohort.held -= 1
            log.warning(
                "cohort %d: let a held client go after %.0f s without GoalCountReached",
                cohort.number,
                self.options.hold_timeout,
            )
            yield integer(self.options.waiting_time_ms)
            return
        sent = False
        try:
            for path in sorted(self.options.layout.init_files.rglob("*")):
                if path.is_file():
                    async with aclosing(file_chunks(path)) as chunks:
                        async for chunk in chunks:
                            yield chunk

            sent = True
        finally:
            if not sent:
                cohort.lost += 1
                log.warning(
                    "cohort %d: a client went away while receiving the files", cohort.number
                )
                cohort.check_complete()

    async def Update(self, messages: AsyncIterator[fl_round_pb2.FlData]) -> fl_round_pb2.FlData:
        cohort = self._reporting
        k = next(self._uploads)
        dest = self.round_files / f"checkpoint_{k}"
        weight = await receive_upload(messages, dest)
        if cohort is None or cohort.complete.is_set():
            log.warning("upload %d arrived with no round waiting for it; ignored", k)
        elif weight is None or weight <= 0:
            log.warning(
                "cohort %d: upload %d has no positive weight (%s); ignored",
                cohort.number,
                k,
                weight,
            )
        else:
            (self.round_files / f"checkpoint_weight_{k}").write_text(f"{weight}\n")
            cohort.uploads.append((dest, weight))
            cohort.check_complete()
        return integer(self.options.waiting_time_ms)

    # -- FLGoalCountBroadcast (coordinator) -------------------------------------

    async def GoalCountReached(self, message: fl_intra_pb2.Empty) -> fl_intra_pb2.Empty:
        cohort = self._selecting
        self._selecting = _Cohort(next(self._numbers))
        log.info(
            "cohort %d: goal reached; sending files to %d client(s) (%d more awaiting the "
            "coordinator's answer)",
            cohort.number,
            cohort.held,
            cohort.asking,
        )

        self._clear_round_files()
        self._reporting = cohort
        cohort.configured = cohort.held
        cohort.go.set()

        cohort.check_complete()
        assert self._nursery is not None
        self._nursery.start_soon(self._finish, cohort)
        return fl_intra_pb2.Empty()

    def _clear_round_files(self) -> None:
        for old in self.round_files.iterdir():
            old.unlink()

    async def _finish(self, cohort: _Cohort) -> None:
        """Wait for the cohort's uploads (bounded), sum them, report to the coordinator."""
        with trio.move_on_after(self.options.report_timeout):
            await cohort.complete.wait()
        cohort.complete.set()  # late uploads belong to no round now
        missing = cohort.configured - len(cohort.uploads)  # lost on the way or silent
        if missing > 0:
            log.warning(
                "cohort %d: %d of %d client(s) did not upload within %.0f s; "
                "aggregating the %d upload(s) that arrived",
                cohort.number,
                missing,
                cohort.configured,
                self.options.report_timeout,
                len(cohort.uploads),
            )
        if not cohort.uploads:
            log.error("cohort %d: no uploads at all; nothing to report", cohort.number)
            return
        job = functools.partial(_sum_uploads, cohort.uploads, self.options.layout, self.id)
        try:
            weight = await trio.to_thread.run_sync(job)
        except AggregationError as error:
            log.error("cohort %d: cannot aggregate the uploads: %s", cohort.number, error)
            return
        log.info(
            "cohort %d: aggregated %d upload(s), total weight %d",
            cohort.number,
            len(cohort.uploads),
            weight,
        )
        try:
            await self._report(cohort)
        except Exception as error:
            log.error("cohort %d: could not report to the coordinator: %s", cohort.number, error)
