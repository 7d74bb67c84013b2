"""A tiny real HTTP server (trio + h11) that records the JSON bodies POSTed to it."""

from __future__ import annotations

import json
from typing import Any

import h11
import trio


class HttpSink:
    """Answers each POST with the next status in ``statuses`` (then 200), keeps the bodies."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        self.port = 0
        self._arrived = trio.Event()

    async def _handle(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        body = b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.attempts += 1
                status = self.statuses.pop(0) if self.statuses else 200
                if status == 200:
                    self.bodies.append(json.loads(body))
                    self._arrived.set()
                    self._arrived = trio.Event()
                headers = [("content-length", "0"), ("connection", "close")]
                await stream.send_all(
                    connection.send(h11.Response(status_code=status, headers=headers))
                )
                await stream.send_all(connection.send(h11.EndOfMessage()))
                await stream.aclose()
                return
            elif isinstance(event, h11.ConnectionClosed):
                return

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def wait_for(self, count: int) -> None:
        while len(self.bodies) < count:
            await self._arrived.wait()
