"""The ``FlIntra`` and ``FlIntraBatch`` servicers: turn selector RPCs into round events.

Selector ids arrive from the network and name folders on disk, so they are
checked here, at the edge, before they reach the round. ``FlIntra`` is the Go
system's contract, unchanged: ``SelectorAggregationComplete`` always answers
``Empty``, since existing selectors expect nothing else. ``FlIntraBatch`` is
our extension (``protos/fl_intra_batch.proto``): batched check-ins that say
which round the clients belong to, releases of clients a selector no longer
holds, and reports that name their round, so a late report of an abandoned
round is refused instead of being taken for the next round's. A refused id goes on
to the status and the log cut to a few hundred characters (it may be 4 MiB).
"""

from __future__ import annotations

from collections.abc import Callable

from .._proto import fl_intra_batch_grpc, fl_intra_batch_pb2, fl_intra_grpc, fl_intra_pb2
from ..coordinator import Admission, Coordinator
from ..errors import InputError
from ..storage.layout import check_selector_id
from ..untrusted_text import cut
from .addresses import split_address

__all__ = ["AnswerCounter", "CheckIns", "IntraBatchServicer", "IntraServicer"]

#: ``count(asked, accepted)``: called once per check-in answer, with client counts (metrics).
AnswerCounter = Callable[[int, int], None]


def _problem_with_id(selector_id: str) -> str | None:
    """Why ``selector_id`` cannot take part in a round, or None if it can."""
    try:
        check_selector_id(selector_id)
        split_address(selector_id)
    except InputError as error:
        return str(error)
    return None


def _ignore(asked: int, accepted: int) -> None:
    pass


class CheckIns:
    """What every selector call does: check the id at the edge, ask the round, count answers."""

    def __init__(self, coordinator: Coordinator, count: AnswerCounter = _ignore) -> None:
        self.coordinator = coordinator
        self._count = count

    async def refused(self, selector_id: str, outcome: str) -> bool:
        """Refuse the call if ``selector_id`` is unusable; shown in the status stream as
        ``"<outcome>: <why>"`` (e.g. ``"check-in refused: ..."``)."""
        problem = _problem_with_id(selector_id)
        if problem is not None:
            await self.coordinator.refused(cut(selector_id), f"{outcome}: {problem}")
        return problem is not None

    async def __call__(self, selector_id: str, clients: int) -> Admission:
        """How many of ``clients`` (>= 1) waiting at ``selector_id`` the round keeps."""
        if await self.refused(selector_id, "check-in refused"):
            admission = Admission(accepted=0, round=0)
        else:
            admission = await self.coordinator.check_in(selector_id, clients)
        self._count(clients, admission.accepted)
        return admission


class IntraServicer(fl_intra_grpc.FlIntraServicer):
    """The Go system's ``FlIntra``: one client per check-in, reports for no named round."""

    def __init__(self, check_ins: CheckIns) -> None:
        self._check_ins = check_ins

    async def ClientCountUpdate(
        self, message: fl_intra_pb2.ClientCount
    ) -> fl_intra_pb2.FlClientStatus:
        admission = await self._check_ins(message.id, 1)
        return fl_intra_pb2.FlClientStatus(accepted=admission.accepted > 0)

    async def SelectorAggregationComplete(
        self, message: fl_intra_pb2.SelectorId
    ) -> fl_intra_pb2.Empty:
        if not await self._check_ins.refused(message.id, "report ignored"):
            await self._check_ins.coordinator.report(message.id)
        return fl_intra_pb2.Empty()


class IntraBatchServicer(fl_intra_batch_grpc.FlIntraBatchServicer):
    """Our extension: ``CheckInClients``, ``ReleaseClients``, ``ReportAggregate``.

    ``CheckInClients`` takes N clients in one call, one round event, one
    answer (how many kept, in which round): at high arrival rates the
    per-client RPC is bound by gRPC's per-call cost, not by the round; a
    selector that batches the clients arriving while its previous call is in
    flight pays that cost once per batch.
    """

    def __init__(self, check_ins: CheckIns) -> None:
        self._check_ins = check_ins

    async def CheckInClients(
        self, message: fl_intra_batch_pb2.ClientBatch
    ) -> fl_intra_batch_pb2.ClientsAccepted:
        if message.clients == 0:
            return fl_intra_batch_pb2.ClientsAccepted(accepted=0)  # nothing asked, nothing changes
        admission = await self._check_ins(message.id, message.clients)
        return fl_intra_batch_pb2.ClientsAccepted(
            accepted=admission.accepted, round=admission.round
        )

    async def ReleaseClients(
        self, message: fl_intra_batch_pb2.ClientRelease
    ) -> fl_intra_batch_pb2.ClientsReleased:
        released = 0
        if message.clients and not await self._check_ins.refused(message.id, "release refused"):
            coordinator = self._check_ins.coordinator
            released = await coordinator.release(message.id, message.clients, message.round)
        return fl_intra_batch_pb2.ClientsReleased(released=released)

    async def ReportAggregate(
        self, message: fl_intra_batch_pb2.AggregateReport
    ) -> fl_intra_batch_pb2.ReportAnswer:
        taken = False
        if not await self._check_ins.refused(message.id, "report ignored"):
            taken = await self._check_ins.coordinator.report_round(message.id, message.round)
        return fl_intra_batch_pb2.ReportAnswer(taken=taken)
