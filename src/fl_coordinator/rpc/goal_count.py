"""``GoalCountReached`` to selectors: dial each selector id as ``host:port``.

Each call has its own time limit, and the calls run concurrently in the
caller's nursery, so one unreachable selector cannot stop the others from
being told.
"""

from __future__ import annotations

import ssl

import trio

from .._proto import fl_intra_grpc, fl_intra_pb2
from ..untrusted_text import shown
from .addresses import dial


async def goal_count_reached(selector_id: str, ssl_context: ssl.SSLContext | None = None) -> None:
    """Tell one selector to configure its clients (the caller sets the time limit).

    With ``ssl_context`` the call goes over TLS (see :func:`.net.dial`).
    """
    async with dial(selector_id, ssl_context) as channel:
        stub = fl_intra_grpc.FLGoalCountBroadcastStub(channel)
        await stub.GoalCountReached(fl_intra_pb2.Empty())


def describe(error: BaseException) -> str:
    """A short reason for the log and the status stream (a selector's text, cut and escaped)."""
    if isinstance(error, trio.TooSlowError):
        return "timed out"
    return shown(str(error) or type(error).__name__)
