"""The reference selector: holds clients, pre-aggregates their updates, reports to the coordinator.

It speaks the Go system's contract. Clients call ``FlRound.CheckIn`` and
``FlRound.Update``; the coordinator calls ``FLGoalCountBroadcast.GoalCountReached``;
the selector checks its clients in with the batched
``flcoordinator.v1.FlIntraBatch.CheckInClients`` (one call for all the clients
that arrived while the previous call was in flight; see checkin_batch.py) on
one connection it keeps (link.py; the Go selector dials per call),
or with ``FlIntra.ClientCountUpdate`` once per client when the coordinator
does not serve the batched call (the Go one), or when told to (``batch_checkin``).
Its id is its own ``host:port``, which also names its folder in shared storage.

A round, as one selector sees it, is a :class:`_Cohort`: the clients the
coordinator accepted, held until ``GoalCountReached``, then sent the files of
``initFiles/``, then expected to upload. With our extension of the wire the
coordinator says which round it accepted them for, and the cohort is named
by that number, in the logs too (the coordinator's lines and the selector's
say the same "round N"). That number is what the selector names when it
gives back clients it no longer holds (``ReleaseClients``: a held client let
go after ``hold_timeout``, or gone before ``GoalCountReached``, so the round
does not count it twice when it comes back) and when it reports
(``ReportAggregate``: a report of a round the coordinator abandoned is
refused, not taken for the next one). Against a coordinator without the
extension it reports with ``FlIntra.SelectorAggregationComplete``, which
names no round. Nothing hangs forever: a held client is let go after
``hold_timeout``, and the cohort is aggregated with whatever arrived after
``report_timeout`` (what was lost is logged).

Operators' mistakes are caught at start-up (:meth:`Selector.serve`): a
``--root`` that does not exist, an id the coordinator cannot dial back, and,
by one call to the coordinator, a wrong address, token or TLS setting.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio
from purerpc.grpclib.status import StatusCode

from .._proto import (
    fl_intra_batch_grpc,
    fl_intra_batch_pb2,
    fl_intra_grpc,
    fl_intra_pb2,
    fl_round_grpc,
    fl_round_pb2,
)
from ..errors import PeerError
from ..log_throttle import Throttle
from ..rpc.listener import serve_grpc
from ..rpc.request_limits import small_requests
from ..storage.aggregation import AggregationError, sum_into
from ..storage.atomic import write_atomic
from ..storage.checkpoint import read_checkpoint_plan
from ..storage.contribution import update_norm
from ..storage.layout import Layout, check_selector_id
from ..storage.untrusted import UntrustedFile
from ..storage.weights import Weight
from .call_errors import explain, is_mistake, rpc_status
from .checkin_batch import Batcher, Grant
from .link import GrpcLink
from .transfer import file_chunks, integer, receive_upload

__all__ = ["Selector", "SelectorOptions"]

log = logging.getLogger(__name__)

#: Time limit of the call to the coordinator at start-up (it may still be starting).
_PROBE_TIMEOUT = 10.0
#: Where to look when the coordinator's address is another kind of port.
_PORT_HINT = "selectors call the coordinator's gRPC PORT, 50050 by default"


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
    #: Differential privacy's C: an upload must have weight 1 and an L2 norm (over all
    #: weight arrays) of at most C, or it is refused before summing. 0: no check.
    clip_norm: float = 0.0

    token: str = field(default="", repr=False)  # sent as `authorization: Bearer` to the coordinator
    coordinator_tls: ssl.SSLContext | None = None  # dial the coordinator over TLS
    server_tls: ssl.SSLContext | None = None  # serve (GoalCountReached, clients) over TLS


@dataclass
class _Cohort:
    """The clients of one round at this selector, and their uploads.

    ``round`` is the coordinator's number of the round (None until it said,
    and for ever with a coordinator that does not: then ``number``, the
    selector's own count, names it).
    """

    number: int
    round: int | None = None
    asking: int = 0  # check-ins whose coordinator answer has not arrived yet
    held: int = 0
    configured: int = 0
    lost: int = 0
    uploads: list[tuple[Path, int]] = field(default_factory=list)
    go: trio.Event = field(default_factory=trio.Event)  # GoalCountReached
    settled: trio.Event = field(default_factory=trio.Event)  # go, or dismissed
    dismissed: bool = False  # its round ended without GoalCountReached here
    superseded: bool = False  # the next round was configured before this one reported
    complete: trio.Event = field(default_factory=trio.Event)
    releases: Batcher | None = None
    announced: bool = False  # "goal reached" was logged

    @property
    def label(self) -> str:
        return f"round {self.round}" if self.round is not None else f"cohort {self.number}"

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
    return rpc_status(error) is StatusCode.UNIMPLEMENTED


def _not_dialable(host: str) -> str | None:
    """Why a peer cannot dial ``host`` (``"wildcard"``, ``"loopback"``), or None if it may."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return "loopback" if host == "localhost" else None
    if address.is_unspecified:
        return "wildcard"
    return "loopback" if address.is_loopback else None


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
        self._in_use: set[str] = set()  # names of uploads a cohort still sums
        self._nursery: trio.Nursery | None = None
        self._batcher: Batcher | None = None
        self._link: GrpcLink | None = None
        self._batch_checkin = options.batch_checkin
        self._throttle = Throttle(log)  # lines every client can cause
        self._plan: tuple[Weight, ...] | None = None  # the checkpoint's weight arrays (clip_norm)

    # -- wiring ---------------------------------------------------------------

    @property
    def folder(self) -> Path:
        return self.options.layout.selector_dir(self.id)

    @property
    def round_files(self) -> Path:
        return self.folder / "roundFiles"

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started`` gets the selector id.

        Raises PeerError (one line, exit status 2) for a setting that cannot
        work: a coordinator that refuses the selector's token or TLS, or is
        not a gRPC server at that address.
        """
        layout = self.options.layout
        # Both generated servicer bases define ``service``; build each one's explicitly.
        services = [
            fl_round_grpc.FlRoundServicer.service.fget(self),  # type: ignore[attr-defined]
            fl_intra_grpc.FLGoalCountBroadcastServicer.service.fget(self),  # type: ignore[attr-defined]
        ]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._throttle.run)
            self._batcher = Batcher(nursery, self._ask_for, self._abandoned)
            self._link = GrpcLink(nursery, self.options.coordinator, self.options.coordinator_tls)
            # Every request is small by the protocol but an Update's file chunks.
            small = small_requests(services)
            del small["/FlRound/Update"]
            serve = functools.partial(
                serve_grpc, ssl_context=self.options.server_tls, request_limits=small
            )
            port = await nursery.start(serve, services, self.options.host, self.options.port)
            self.id = check_selector_id(f"{self.options.advertise or self.options.host}:{port}")
            self._warn_if_undialable()
            self.round_files.mkdir(parents=True, exist_ok=True)
            self._clear_round_files()  # a previous run's
            await self._probe_coordinator()
            problem = self._init_files_problem()
            if problem is not None:
                log.warning("%s: clients are told to come back until it is there", problem)
            log.info(
                "selector %s serving (coordinator %s, root %s)",
                self.id,
                self.options.coordinator,
                layout.root,
            )
            task_status.started(self.id)

    def _warn_if_undialable(self) -> None:
        """The coordinator dials the id to say GoalCountReached: say so if it cannot.

        A wildcard host (``0.0.0.0``) can never be dialled; a loopback one only
        by a coordinator on this machine (one whose address is loopback too).
        """
        host = self.id.rpartition(":")[0]
        kind = _not_dialable(host)
        local = _not_dialable(self.options.coordinator.rpartition(":")[0]) == "loopback"
        if kind is None or (kind == "loopback" and local):
            return
        log.warning(
            "selector id %s: %s is a %s address; the coordinator at %s dials the id to say "
            "GoalCountReached and cannot reach this selector there: set --advertise to this "
            "machine's name or address as the coordinator sees it",
            self.id,
            host,
            kind,
            self.options.coordinator,
        )

    def _init_files_problem(self) -> str | None:
        """Why the files clients need cannot be sent now (None: they can)."""
        layout = self.options.layout
        for needed in (layout.model, layout.checkpoint):
            if not needed.is_file():
                return (
                    f"{needed} is missing (is {layout.root} the coordinator's FL_ROOT_PATH, "
                    "initialised with fl-coordinator init?)"
                )
        return None

    async def _call(self, invoke: Callable[[Any, tuple[tuple[str, str], ...]], Awaitable[Any]]):
        """``invoke(channel, metadata)`` on the connection shared by all calls (the Go
        selector dials per call), with the token, within the call time limit."""
        assert self._link is not None
        token = self.options.token
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        # purerpc waits forever on a connection the server dropped (a TLS or
        # size refusal): a time limit turns that into an error the caller handles.
        with trio.fail_after(self.options.call_timeout):
            return await self._link.call(lambda channel: invoke(channel, metadata))

    async def _probe_coordinator(self) -> None:
        """One call that changes nothing (a batch of 0 clients): a mistake in the address,
        the token or TLS stops the selector now, not a client at a time later."""
        request = fl_intra_batch_pb2.ClientBatch(id=self.id, clients=0)
        try:
            with trio.fail_after(min(_PROBE_TIMEOUT, self.options.call_timeout)):
                await self._call(
                    lambda channel, metadata: fl_intra_batch_grpc.FlIntraBatchStub(
                        channel
                    ).CheckInClients(request, metadata=metadata)
                )
        except Exception as error:
            if _unimplemented(error):
                self._no_extension()
                return
            reason = explain(error, self.options.coordinator, "coordinator", _PORT_HINT)
            if is_mistake(error):
                raise PeerError(reason) from None
            log.warning("%s; going on: each client's check-in will try again", reason)

    def _no_extension(self) -> None:
        if self._batch_checkin:
            log.info("the coordinator has no batched check-in; asking once per client")
            self._batch_checkin = False

    def _unreachable(self, error: Exception, what: str) -> None:
        """A failed call to the coordinator, in one line per kind and minute."""
        reason = explain(error, self.options.coordinator, "coordinator", _PORT_HINT)
        self._throttle.warning(what, "%s: %s", what, reason, peer="")

    async def _ask_for(self, clients: int) -> Grant:
        """How many of ``clients`` waiting clients the coordinator keeps (batched if it can),
        and the number of the round they are for (0: it does not say)."""
        if self._batch_checkin:
            request = fl_intra_batch_pb2.ClientBatch(id=self.id, clients=clients)
            try:
                answer = await self._call(
                    lambda channel, metadata: fl_intra_batch_grpc.FlIntraBatchStub(
                        channel
                    ).CheckInClients(request, metadata=metadata)
                )
            except Exception as error:
                if not _unimplemented(error):
                    raise
                self._no_extension()
            else:
                return answer.accepted, answer.round
        accepted = 0

        async def ask_one() -> None:
            nonlocal accepted
            self._checked_in += 1
            request = fl_intra_pb2.ClientCount(count=self._checked_in, id=self.id)
            answer = await self._call(
                lambda channel, metadata: fl_intra_grpc.FlIntraStub(channel).ClientCountUpdate(
                    request, metadata=metadata
                )
            )
            accepted += answer.accepted

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(ask_one)
        return accepted, 0

    def _cohort_for(self, asked_in: _Cohort, round_no: int) -> _Cohort:
        """The cohort of a client the coordinator accepted in round ``round_no`` (0: unnamed).

        A client belongs to the cohort selecting when it asked (GoalCountReached
        may overtake the coordinator's answer). An answer for a later round than
        the selecting cohort's means that round ended without its goal (its
        selection window closed, or the coordinator restarted): its held clients
        are not counted any more, and are told to check in again.
        """
        if round_no == 0:
            return asked_in
        for cohort in (asked_in, self._selecting):
            if cohort.round in (None, round_no):
                cohort.round = round_no
                return cohort
        old = self._selecting
        self._selecting = _Cohort(next(self._numbers), round=round_no)
        old.dismissed = True
        old.settled.set()
        log.info(
            "%s ended without its goal here (the coordinator is in round %d): its %d held "
            "client(s) are told to check in again",
            old.label,
            round_no,
            old.held,
        )
        return self._selecting

    def _abandoned(self, round_no: int) -> None:
        """A client that went away while its check-in was asked about was accepted: give it back."""
        cohort = self._cohort_for(self._selecting, round_no)
        if not cohort.go.is_set() and self._nursery is not None:
            self._nursery.start_soon(self._release, cohort)

    async def _release(self, cohort: _Cohort) -> None:
        """Tell the coordinator one held client of ``cohort`` is gone (batched with others)."""
        if cohort.round is None or self._nursery is None:
            return  # a coordinator that names no rounds cannot be told (the old wire)
        if cohort.releases is None:
            ask = functools.partial(self._release_many, cohort)
            cohort.releases = Batcher(self._nursery, ask)
        try:
            await cohort.releases.ask()
        except Exception as error:
            self._unreachable(error, f"{cohort.label}: could not give back a client")

    async def _release_many(self, cohort: _Cohort, clients: int) -> Grant:
        assert cohort.round is not None
        request = fl_intra_batch_pb2.ClientRelease(id=self.id, clients=clients, round=cohort.round)
        answer = await self._call(
            lambda channel, metadata: fl_intra_batch_grpc.FlIntraBatchStub(channel).ReleaseClients(
                request, metadata=metadata
            )
        )
        log.info(
            "%s: %d held client(s) let go; the coordinator no longer counts %d of them",
            cohort.label,
            clients,
            answer.released,
        )
        return answer.released, cohort.round

    async def _report(self, cohort: _Cohort) -> None:
        """Tell the coordinator the aggregate is written: for its round, if it names rounds."""
        if cohort.round is not None:
            request = fl_intra_batch_pb2.AggregateReport(id=self.id, round=cohort.round)
            try:
                answer = await self._call(
                    lambda channel, metadata: fl_intra_batch_grpc.FlIntraBatchStub(
                        channel
                    ).ReportAggregate(request, metadata=metadata)
                )
            except Exception as error:
                if not _unimplemented(error):
                    raise
                self._no_extension()
            else:
                if answer.taken:
                    log.info("%s: reported to the coordinator", cohort.label)
                else:
                    log.warning(
                        "%s: the coordinator refused the report: it is no longer in that round "
                        "(a restart abandons the round under way) or expected no report from "
                        "this selector; this aggregate is not used",
                        cohort.label,
                    )
                return
        request = fl_intra_pb2.SelectorId(id=self.id)
        await self._call(
            lambda channel, metadata: fl_intra_grpc.FlIntraStub(
                channel
            ).SelectorAggregationComplete(request, metadata=metadata)
        )
        log.info("%s: reported to the coordinator", cohort.label)

    # -- FlRound (clients) ------------------------------------------------------

    async def CheckIn(
        self, requests: AsyncIterator[fl_round_pb2.CheckInRequest]
    ) -> AsyncIterator[fl_round_pb2.FlData]:
        async for _ in requests:
            break
        problem = self._init_files_problem()
        if problem is not None:
            self._throttle.warning("no initFiles", "%s: a client is told to come back", problem)
            yield integer(self.options.waiting_time_ms)
            return
        cohort = await self._admit()
        if cohort is None or not await self._hold(cohort):
            yield integer(self.options.waiting_time_ms)
            return
        async with aclosing(self._send_init_files(cohort)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _admit(self) -> _Cohort | None:
        """Ask the coordinator to keep one more client: its cohort, or None if refused."""
        assert self._batcher is not None
        asked_in = self._selecting
        asked_in.asking += 1
        try:
            accepted, round_no = await self._batcher.ask()
        except Exception as error:
            self._unreachable(error, "could not ask the coordinator about a client")
            accepted, round_no = False, 0
        finally:
            asked_in.asking -= 1
        cohort = self._cohort_for(asked_in, round_no) if accepted else None
        if cohort is not None:
            cohort.held += 1
            if cohort.go.is_set():
                cohort.configured += 1
            cohort.check_complete()
        asked_in.check_complete()
        self._announce(asked_in)
        return cohort

    async def _hold(self, cohort: _Cohort) -> bool:
        """Hold an accepted client until GoalCountReached (True), or let it go (False)."""
        try:
            with trio.move_on_after(self.options.hold_timeout):
                await cohort.settled.wait()
        except trio.Cancelled:  # it went away (or the selector stops)
            if not cohort.settled.is_set():
                cohort.held -= 1
                assert self._nursery is not None
                self._nursery.start_soon(self._release, cohort)
            raise
        if cohort.go.is_set():
            return True
        cohort.held -= 1
        if not cohort.dismissed:
            self._throttle.warning(
                "let held clients go",
                "%s: let a held client go after %.0f s without GoalCountReached",
                cohort.label,
                self.options.hold_timeout,
                peer="",
            )
            await self._release(cohort)  # before it may come back and be counted again
        return False

    async def _send_init_files(self, cohort: _Cohort) -> AsyncIterator[fl_round_pb2.FlData]:
        """Every file of ``initFiles/`` as chunks; a client that does not get them all is lost."""
        sent = False
        try:
            for path in sorted(self.options.layout.init_files.rglob("*")):
                if path.is_file():
                    async with aclosing(file_chunks(path)) as chunks:
                        async for chunk in chunks:
                            yield chunk
            sent = True
        except OSError as error:
            log.error("%s: cannot send %s to a client: %s", cohort.label, error.filename, error)
        finally:
            if not sent:
                cohort.lost += 1
                log.warning("%s: a client did not receive every file", cohort.label)
                cohort.check_complete()

    async def Update(self, messages: AsyncIterator[fl_round_pb2.FlData]) -> fl_round_pb2.FlData:
        cohort = self._reporting
        k = next(self._uploads)
        dest = self.round_files / f"checkpoint_{k}"
        weight = await receive_upload(messages, dest)
        refused = None
        if cohort is not None and weight is not None and weight > 0 and self.options.clip_norm:
            refused = await trio.to_thread.run_sync(self._beyond_clip, dest, weight)
        if cohort is None or cohort.complete.is_set():
            log.warning("upload %d arrived with no round waiting for it; ignored", k)
        elif weight is None or weight <= 0:
            log.warning(
                "%s: upload %d has no positive weight (%s); ignored", cohort.label, k, weight
            )
        elif refused is not None:
            log.warning("%s: upload %d refused: %s", cohort.label, k, refused)
            cohort.lost += 1  # its client's share is not summed: the cohort expects one less
            cohort.check_complete()
        else:
            (self.round_files / f"checkpoint_weight_{k}").write_text(f"{weight}\n")
            cohort.uploads.append((dest, weight))
            cohort.check_complete()
        return integer(self.options.waiting_time_ms)

    def _beyond_clip(self, upload: Path, weight: int) -> str | None:
        """In a worker thread: why ``upload`` breaks differential privacy's bound (None: it
        does not). Each client counts once: weight 1, an update of L2 norm <= C (a relative
        1e-6 more for float32 rounding of a clipped update)."""
        clip = self.options.clip_norm
        if weight != 1:
            return f"weight {weight}, not 1 (under differential privacy each client counts once)"
        try:
            if self._plan is None:
                self._plan = read_checkpoint_plan(self.options.layout.checkpoint)
            norm = update_norm(UntrustedFile.at(upload), self._plan)
        except (AggregationError, OSError) as error:
            return f"cannot be measured ({error})"
        if not norm <= clip * (1 + 1e-6):
            return f"L2 norm {norm:.6g} exceeds the clip norm {clip:g}"
        return None

    # -- FLGoalCountBroadcast (coordinator) -------------------------------------

    async def GoalCountReached(self, message: fl_intra_pb2.Empty) -> fl_intra_pb2.Empty:
        cohort = self._selecting
        if not cohort.held and not cohort.asking:
            # The coordinator tells only selectors holding clients: a call again
            # (a retry after a lost answer), or all of them let go meanwhile.
            log.info("GoalCountReached with no client held for it; nothing to configure")
            return fl_intra_pb2.Empty()
        self._selecting = _Cohort(next(self._numbers))
        previous = self._reporting
        if previous is not None and not previous.complete.is_set():
            previous.superseded = True  # the coordinator moved on: its report would be refused
            previous.complete.set()
        self._clear_round_files()
        self._reporting = cohort
        cohort.configured = cohort.held
        cohort.go.set()
        cohort.settled.set()
        self._announce(cohort)

        cohort.check_complete()
        assert self._nursery is not None
        self._nursery.start_soon(self._finish, cohort)
        return fl_intra_pb2.Empty()

    def _announce(self, cohort: _Cohort) -> None:
        """Log "goal reached" once, naming the coordinator's round number.

        GoalCountReached may overtake the check-in answers that say which round
        the clients are for: then the line waits for the first of them (or for the
        last answer, from a coordinator that names no rounds: ``cohort N``).
        """
        if cohort.announced or not cohort.go.is_set():
            return
        if cohort.round is None and cohort.asking:
            return  # an answer on its way names the round
        cohort.announced = True
        log.info(
            "%s: goal reached; sending files to %d client(s) (%d more awaiting the "
            "coordinator's answer)",
            cohort.label,
            cohort.configured,
            cohort.asking,
        )

    def _clear_round_files(self) -> None:
        """Remove the uploads of rounds that are over (not those still being summed)."""
        for old in self.round_files.iterdir():
            if old.name.replace("_weight", "") not in self._in_use:
                old.unlink()

    async def _finish(self, cohort: _Cohort) -> None:
        """Wait for the cohort's uploads (bounded), sum them, report to the coordinator."""
        with trio.move_on_after(self.options.report_timeout):
            await cohort.complete.wait()
        cohort.complete.set()  # late uploads belong to no round now
        if cohort.superseded:
            log.warning(
                "%s: the coordinator configured the next round before this one's uploads "
                "were in: it is over, its %d upload(s) are not used",
                cohort.label,
                len(cohort.uploads),
            )
            return
        missing = cohort.configured - len(cohort.uploads)  # lost on the way or silent
        if missing > 0:
            log.warning(
                "%s: %d of %d client(s) did not upload within %.0f s; "
                "aggregating the %d upload(s) that arrived",
                cohort.label,
                missing,
                cohort.configured,
                self.options.report_timeout,
                len(cohort.uploads),
            )
        if not cohort.uploads:
            log.error("%s: no uploads at all; nothing to report", cohort.label)
            return
        names = {path.name for path, _ in cohort.uploads}
        self._in_use |= names
        job = functools.partial(_sum_uploads, cohort.uploads, self.options.layout, self.id)
        try:
            weight = await trio.to_thread.run_sync(job)
        except AggregationError as error:
            log.error("%s: cannot aggregate the uploads: %s", cohort.label, error)
            return
        finally:
            self._in_use -= names
        log.info(
            "%s: aggregated %d upload(s), total weight %d",
            cohort.label,
            len(cohort.uploads),
            weight,
        )
        try:
            await self._report(cohort)
        except Exception as error:
            log.error(
                "%s: could not report to the coordinator: %s",
                cohort.label,
                explain(error, self.options.coordinator, "coordinator", _PORT_HINT),
            )
