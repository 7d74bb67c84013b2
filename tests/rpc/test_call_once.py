"""``call_once`` (GoalCountReached, the legacy status push) against a grpcio server that shuts
down under the call: a caller cancelled meanwhile ends cancelled, never with purerpc's errors."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import trio

from fl_coordinator._proto import fl_status_grpc, fl_status_pb2
from fl_coordinator.rpc.addresses import call_once


async def _cancelled_while_the_server_stops() -> str:
    """One call whose handler cancels the caller and stops its grpcio server (GOAWAY, PING):
    how the caller ended."""
    token = trio.lowlevel.current_trio_token()
    scope = trio.CancelScope()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))

    def round_status(request: bytes, context: grpc.ServicerContext) -> bytes:
        token.run_sync_soon(scope.cancel)
        threading.Thread(target=server.stop, args=(None,)).start()
        return fl_status_pb2.NULL().SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        "FlStatus", {"RoundStatus": grpc.unary_unary_rpc_method_handler(round_status)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    request = fl_status_pb2.FlRoundStatus(stage=fl_status_pb2.REPORTING, roundNo=4)
    try:
        with scope:
            await call_once(
                f"127.0.0.1:{port}",
                lambda channel: fl_status_grpc.FlStatusStub(channel).RoundStatus(request),
                seconds=30,
            )
        return "cancelled" if scope.cancelled_caught else "answered"
    except Exception as error:
        return repr(error)
    finally:
        server.stop(None)


async def test_a_caller_cancelled_while_the_peer_shuts_down_ends_cancelled() -> None:
    # purerpc's h2 refuses the frames after a GOAWAY (ProtocolError in its reader task); without
    # care that error escapes the caller's cancelled scope in about 1 call of 8 (measured: 8 of 60)
    # and ends its nursery. 20 calls: such a fault shows with a probability of 93 %.
    outcomes = [await _cancelled_while_the_server_stops() for _ in range(20)]
    assert set(outcomes) <= {"cancelled", "answered"}, outcomes
