"""A gRPC server whose connection limit is above its descriptors: it must run out and shed.

``python emfile_server.py`` serves ``FlIntra.ClientCountUpdate`` (always
accepted) with our listener and a connection limit of 100,000, prints its
port, and runs until killed. Started under ``prlimit --nofile=N``, it hits
EMFILE in ``accept`` long before the limit: what the coordinator meets when
something else uses up its descriptors.
"""

from __future__ import annotations

import logging
import sys

import trio

from fl_coordinator._proto import fl_intra_grpc, fl_intra_pb2
from fl_coordinator.connections import ConnectionLimits
from fl_coordinator.rpc.listener import serve_grpc


class Accepting(fl_intra_grpc.FlIntraServicer):
    async def ClientCountUpdate(
        self, message: fl_intra_pb2.ClientCount
    ) -> fl_intra_pb2.FlClientStatus:
        return fl_intra_pb2.FlClientStatus(accepted=True)


async def main() -> None:
    limits = ConnectionLimits(max_connections=100_000)
    async with trio.open_nursery() as nursery:
        serve = await nursery.start(
            lambda task_status: serve_grpc(
                [Accepting().service], "127.0.0.1", 0, limits=limits, task_status=task_status
            )
        )
        print(serve, flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    trio.run(main)
