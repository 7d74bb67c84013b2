"""Relays of TCP connections, for tests that count or cut what a client holds."""

from __future__ import annotations

import trio

__all__ = ["relay"]


async def relay(client: trio.abc.Stream, target: int) -> None:
    """Forward ``client`` to 127.0.0.1:``target`` both ways until either side ends."""
    server = await trio.open_tcp_stream("127.0.0.1", target)
    async with client, server, trio.open_nursery() as pipes:
        pipes.start_soon(_pipe, client, server, pipes.cancel_scope)
        pipes.start_soon(_pipe, server, client, pipes.cancel_scope)


async def _pipe(source: trio.abc.Stream, dest: trio.abc.Stream, done: trio.CancelScope) -> None:
    try:
        async for data in source:
            await dest.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()
