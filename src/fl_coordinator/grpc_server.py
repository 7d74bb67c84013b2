"""A purerpc server bound to one address, without ``SO_REUSEPORT``.

purerpc's stock ``Server`` listens on every interface with ``SO_REUSEPORT``:
a second coordinator started by mistake would silently share the port with
the first and split the round between them, and there is no way to choose
the interface. We bind the listener ourselves (``SO_REUSEADDR`` only, which
on Linux still refuses a port another socket listens on) and hand each
connection to purerpc's own connection handler.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import anyio.abc
import purerpc
import trio
from purerpc.server import ConnectionHandler

from .net import bind_error


class _Counters:
    """What purerpc's ConnectionHandler expects of its server: two counters."""

    _connection_count = 0
    _exception_count = 0


async def serve_grpc(
    services: Sequence[purerpc.Service],
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``services`` on ``host:port``; ``task_status.started`` gets the bound port."""
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as error:
        raise bind_error("PORT", host, port, error) from None
    async with listener:
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started(bound)
        handler = ConnectionHandler({s.name: s for s in services}, _Counters())
        await listener.serve(handler)
