"""``GoalCountReached`` to selectors: dial each selector id as ``host:port`` and call.

The round task calls a :class:`GoalCountClient` (handed to it by the
composition root) concurrently for every selector of a round, with retries,
so one unreachable selector cannot stop the others from being told.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from .._proto import fl_intra_grpc, fl_intra_pb2
from .addresses import call_once

__all__ = ["GoalCountClient"]


@dataclass(frozen=True)
class GoalCountClient:
    """Tells one selector at a time to configure its clients.

    Each call has its own time limit, ``call_timeout`` seconds; with
    ``ssl_context`` it goes over TLS (see :func:`.addresses.dial`).
    """

    call_timeout: float
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    async def __call__(self, selector_id: str) -> None:
        """``GoalCountReached`` to ``selector_id``; TimeoutError if it does not answer in time."""
        await call_once(
            selector_id,
            lambda channel: fl_intra_grpc.FLGoalCountBroadcastStub(channel).GoalCountReached(
                fl_intra_pb2.Empty()
            ),
            seconds=self.call_timeout,
            ssl_context=self.ssl_context,
        )
