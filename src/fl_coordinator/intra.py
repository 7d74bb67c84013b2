"""The ``FlIntra`` servicer: turns selector RPCs into round events.

Selector ids arrive from the network and name folders on disk, so they are
checked here, at the edge, before they reach the round. ``SelectorAggregationComplete``
always answers ``Empty``: existing selectors expect nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

from ._proto import fl_intra_grpc, fl_intra_pb2
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


def _ignore(accepted: bool) -> None:
    pass


class IntraServicer(fl_intra_grpc.FlIntraServicer):
    """``answered(accepted)`` is called once per ``ClientCountUpdate`` answer (metrics)."""

    def __init__(
        self, coordinator: Coordinator, answered: Callable[[bool], None] = _ignore
    ) -> None:
        self._coordinator = coordinator
        self._answered = answered

    async def ClientCountUpdate(
        self, message: fl_intra_pb2.ClientCount
    ) -> fl_intra_pb2.FlClientStatus:
        problem = problem_with_id(message.id)
        if problem is not None:
            await self._coordinator.refused(message.id, f"check-in refused: {problem}")
            accepted = False
        else:
            accepted = await self._coordinator.check_in(message.id)
        self._answered(accepted)
        return fl_intra_pb2.FlClientStatus(accepted=accepted)

    async def SelectorAggregationComplete(
        self, message: fl_intra_pb2.SelectorId
    ) -> fl_intra_pb2.Empty:
        problem = problem_with_id(message.id)
        if problem is not None:
            await self._coordinator.refused(message.id, f"report ignored: {problem}")

        else:
            await self._coordinator.report(message.id)
        return fl_intra_pb2.Empty()
