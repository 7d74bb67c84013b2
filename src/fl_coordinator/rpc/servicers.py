"""The ``FlIntra`` and ``FlIntraBatch`` servicers: turn selector RPCs into round events.

Selector ids arrive from the network and name folders on disk, so they are
checked here, at the edge, before they reach the round; a refused one goes on
to the status and the log cut to a few hundred characters (it may be 4 MiB).
``SelectorAggregationComplete`` always answers ``Empty``: existing selectors
expect nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

from .._proto import fl_intra_batch_grpc, fl_intra_batch_pb2, fl_intra_grpc, fl_intra_pb2
from ..coordinator import Coordinator
from ..storage.layout import InvalidSelectorId, check_selector_id
from ..untrusted_text import cut
from .addresses import BadAddress, split_address

#: ``answered(asked, accepted)``: called once per check-in answer, with client counts (metrics).
Answered = Callable[[int, int], None]


def problem_with_id(selector_id: str) -> str | None:
    """Why ``selector_id`` cannot take part in a round, or None if it can."""
    try:
        check_selector_id(selector_id)
        split_address(selector_id)
    except (InvalidSelectorId, BadAddress) as error:
        return str(error)
    return None


def _ignore(asked: int, accepted: int) -> None:
    pass


class CheckIns:
    """What both check-in calls do: check the id at the edge, ask the round, count the answer."""

    def __init__(self, coordinator: Coordinator, answered: Answered = _ignore) -> None:
        self._coordinator = coordinator
        self._answered = answered

    async def __call__(self, selector_id: str, clients: int) -> int:
        """How many of ``clients`` (>= 1) waiting at ``selector_id`` the round keeps."""
        problem = problem_with_id(selector_id)
        if problem is not None:
            await self._coordinator.refused(cut(selector_id), f"check-in refused: {problem}")
            accepted = 0
        else:
            accepted = await self._coordinator.check_in(selector_id, clients)
        self._answered(clients, accepted)
        return accepted


class IntraServicer(fl_intra_grpc.FlIntraServicer):
    def __init__(self, coordinator: Coordinator, check_ins: CheckIns) -> None:
        self._coordinator = coordinator
        self._check_ins = check_ins

    async def ClientCountUpdate(
        self, message: fl_intra_pb2.ClientCount
    ) -> fl_intra_pb2.FlClientStatus:
        accepted = await self._check_ins(message.id, 1)
        return fl_intra_pb2.FlClientStatus(accepted=accepted > 0)

    async def SelectorAggregationComplete(
        self, message: fl_intra_pb2.SelectorId
    ) -> fl_intra_pb2.Empty:
        problem = problem_with_id(message.id)
        if problem is not None:
            await self._coordinator.refused(cut(message.id), f"report ignored: {problem}")

        else:
            await self._coordinator.report(message.id)
        return fl_intra_pb2.Empty()


class IntraBatchServicer(fl_intra_batch_grpc.FlIntraBatchServicer):
    """``CheckInClients``: N clients in one call, one round event, one answer (how many kept).

    At high arrival rates the per-client RPC is bound by gRPC's per-call cost,
    not by the round; a selector that batches the clients arriving while its
    previous call is in flight pays that cost once per batch.
    """

    def __init__(self, check_ins: CheckIns) -> None:
        self._check_ins = check_ins

    async def CheckInClients(
        self, message: fl_intra_batch_pb2.ClientBatch
    ) -> fl_intra_batch_pb2.ClientsAccepted:
        if message.clients == 0:
            return fl_intra_batch_pb2.ClientsAccepted(accepted=0)  # nothing asked, nothing changes
        accepted = await self._check_ins(message.id, message.clients)
        return fl_intra_batch_pb2.ClientsAccepted(accepted=accepted)
