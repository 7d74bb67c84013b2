"""The Go system's webserver, as far as the legacy status push sees it: a grpcio ``FlStatus``
server (the method path spelled out by hand, so a wrong path in our proto would show), and a
webserver that accepts TCP connections and never answers."""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
import trio

from fl_coordinator._proto import fl_status_pb2
from helpers.arrivals import Arrivals

__all__ = ["LegacyWebserver", "StalledWebserver"]


class LegacyWebserver:
    """``FlStatus/RoundStatus`` on a port chosen now, served from :meth:`start` to :meth:`stop`.

    Until it starts, the port is bound but not listening, so a push to it is
    refused (a webserver that is down) and no other process can take the port.
    Each request lands in ``received`` as ``(stage name, roundNo)``; the first
    ``failures`` calls are answered ``UNAVAILABLE`` instead (and counted in ``calls``).
    """

    def __init__(self, failures: int = 0) -> None:
        self.received: Arrivals[tuple[str, int]] = Arrivals()
        self.calls = 0
        self._failures = failures
        self._holder = socket.socket()
        self._holder.bind(("127.0.0.1", 0))
        self.port: int = self._holder.getsockname()[1]
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        token = trio.lowlevel.current_trio_token()

        def round_status(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls += 1  # one worker thread: no race
            if self.calls <= self._failures:
                context.abort(grpc.StatusCode.UNAVAILABLE, "starting up")
            status = fl_status_pb2.FlRoundStatus.FromString(request)
            item = (fl_status_pb2.Stages.Name(status.stage), status.roundNo)
            token.run_sync_soon(self.received.add, item)
            return fl_status_pb2.NULL().SerializeToString()

        handler = grpc.method_handlers_generic_handler(
            "FlStatus", {"RoundStatus": grpc.unary_unary_rpc_method_handler(round_status)}
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        self._server.add_generic_rpc_handlers((handler,))
        self._holder.close()
        assert self._server.add_insecure_port(self.address) == self.port
        self._server.start()

    def stop(self) -> None:
        self._holder.close()
        if self._server is not None:
            self._server.stop(grace=None)

    async def wait_for(self, item: tuple[str, int]) -> None:
        await self.received.wait_for(lambda received: received == item, "the legacy webserver")


class StalledWebserver:
    """Accepts every TCP connection and never reads or answers; ``connected`` once one came."""

    def __init__(self) -> None:
        self.connected = trio.Event()
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]

        async def hold(stream: trio.SocketStream) -> None:
            self.connected.set()
            await trio.sleep_forever()  # the stream stays open, never read: the call hangs

        task_status.started()
        await trio.serve_listeners(hold, listeners)
