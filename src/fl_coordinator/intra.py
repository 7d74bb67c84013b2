"""The ``FlIntra`` and ``FlIntraBatch`` servicers: turn selector RPCs into round events.

Selector ids arrive from the network and name folders on disk, so they are
checked here, at the edge, before they reach the round. ``SelectorAggregationComplete``
always answers ``Empty``: existing selectors expect nothing else.
"""

from __future__ import annotations

from ._proto import fl_intra_batch_grpc, fl_intra_batch_pb2, fl_intra_grpc, fl_intra_pb2
from .coordinator import Coordinator
from .layout import InvalidSelectorId, check_selector_id
from .net import BadAddress, split_address


def problem_with_id(selector_id: str) -> str | None:
    """Why ``selector_id`` cannot take part in a round, or None if it can."""
    try:
        check_selector_id(selector_id)
        split_address(selector_id)
    except (InvalidSelectorId, BadAddress) as error:
        return str(error)
    return None


class IntraServicer(fl_intra_grpc.FlIntraServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    async def ClientCountUpdate(
        self, message: fl_intra_pb2.ClientCount
    ) -> fl_intra_pb2.FlClientStatus:
        problem = problem_with_id(message.id)
        if problem is not None:
            await self._coordinator.refused(message.id, f"check-in refused: {problem}")
            return fl_intra_pb2.FlClientStatus(accepted=False)
        accepted = await self._coordinator.check_in(message.id)
        return fl_intra_pb2.FlClientStatus(accepted=accepted > 0)

    async def SelectorAggregationComplete(
        self, message: fl_intra_pb2.SelectorId
    ) -> fl_intra_pb2.Empty:
        problem = problem_with_id(message.id)
        if problem is not None:
            await self._coordinator.refused(message.id, f"report ignored: {problem}")

        else:
            await self._coordinator.report(message.id)
        return fl_intra_pb2.Empty()


class IntraBatchServicer(fl_intra_batch_grpc.FlIntraBatchServicer):
    """``CheckInClients``: N clients in one call, one round event, one answer (how many kept).

    At high arrival rates the per-client RPC is bound by gRPC's per-call cost,
    not by the round; a selector that batches the clients arriving while its
    previous call is in flight pays that cost once per batch.
    """

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    async def CheckInClients(
        self, message: fl_intra_batch_pb2.ClientBatch
    ) -> fl_intra_batch_pb2.ClientsAccepted:
        problem = problem_with_id(message.id)
        if problem is not None:
            await self._coordinator.refused(message.id, f"check-in refused: {problem}")
            return fl_intra_batch_pb2.ClientsAccepted(accepted=0)
        if message.clients == 0:
            return fl_intra_batch_pb2.ClientsAccepted(accepted=0)  # nothing asked, nothing changes
        accepted = await self._coordinator.check_in(message.id, message.clients)
        return fl_intra_batch_pb2.ClientsAccepted(accepted=accepted)
