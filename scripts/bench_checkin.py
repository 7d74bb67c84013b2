"""Check-in part of scripts/bench: ``ClientCountUpdate`` throughput and latency.

Two servers, each in its own process, are hammered in turn by a third process
(grpcio's ``grpc.aio``, an independent gRPC implementation), with 1 and with
16 concurrent callers, each caller on its own connection as separate
selectors would be:

* ``bare``: purerpc's stock ``Server`` answering ``accepted=True`` at once,
  the most a purerpc server can do on this machine (the reference);
* ``ours``: the coordinator (``serve()``) on a problem whose goal count is
  never reached, so every call goes through the round state task.

``ours/bare`` is the ratio the issue targets. Then the batched check-in
(``flcoordinator.v1.FlIntraBatch/CheckInClients``): the same callers ask for ``batch`` clients
per call, and we report clients admitted per second against the per-client
RPC measured above.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_report import percentile

HERE = Path(__file__).resolve().parent


# -- servers (each run in its own process: `bench_checkin.py serve MODE ROOT`) --------


async def _serve_bare() -> None:
    import purerpc
    import trio

    from fl_coordinator._proto import fl_intra_grpc, fl_intra_pb2

    class Constant(fl_intra_grpc.FlIntraServicer):
        async def ClientCountUpdate(self, message: Any) -> Any:
            return fl_intra_pb2.FlClientStatus(accepted=True)

    server = purerpc.Server(port=0)
    server.add_service(Constant().service)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve_async)
        print(json.dumps({"port": port}), flush=True)


async def _serve_ours(root: Path) -> None:
    import trio
    from bench_round import tiny_problem

    from fl_coordinator.app import serve
    from fl_coordinator.config import default_settings

    settings = default_settings().replace(
        fl_root_path=str(root), host="127.0.0.1", port=0, status_port=0, checkin_limit=10**9
    )
    tiny_problem(settings)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(serve, settings)
        print(json.dumps({"port": endpoints.grpc_port}), flush=True)


def serve_main(mode: str, root: Path) -> None:
    import logging

    import trio

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("purerpc").setLevel(logging.ERROR)  # torn-down connections, by design
    trio.run(_serve_bare) if mode == "bare" else trio.run(_serve_ours, root)


class Server:
    """A server process, listening on ``port`` once constructed; :meth:`stop` kills it."""

    def __init__(self, mode: str, root: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "serve", mode, str(root)],
            stdout=subprocess.PIPE, text=True, cwd=HERE,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {mode} server did not start")
        self.port = int(json.loads(line)["port"])

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


# -- load (its own process: `bench_checkin.py load PORT CALLERS SECONDS BATCH`) ---------


async def _load(port: int, callers: int, seconds: float, batch: int) -> dict[str, Any]:
    import asyncio

    import grpc

    from fl_coordinator._proto import fl_intra_batch_pb2, fl_intra_pb2

    if batch:
        path = "/flcoordinator.v1.FlIntraBatch/CheckInClients"
        request = fl_intra_batch_pb2.ClientBatch(id="127.0.0.1:9", clients=batch)
        reply_type: Any = fl_intra_batch_pb2.ClientsAccepted
    else:
        path = "/FlIntra/ClientCountUpdate"
        request = fl_intra_pb2.ClientCount(count=1, id="127.0.0.1:9")
        reply_type = fl_intra_pb2.FlClientStatus
    payload = request.SerializeToString()
    latencies: list[float] = []
    admitted = 0
    warmup_until = time.perf_counter() + min(1.0, seconds / 3)
    stop_at = warmup_until + seconds

    async def caller() -> None:
        nonlocal admitted
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                path, request_serializer=None, response_deserializer=reply_type.FromString
            )
            while (start := time.perf_counter()) < stop_at:
                reply = await call(payload)
                if start >= warmup_until:
                    latencies.append(time.perf_counter() - start)
                    admitted += reply.accepted if batch else int(reply.accepted)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return {
        "calls_per_s": len(latencies) / seconds,
        "clients_per_s": admitted / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


def load_main(port: int, callers: int, seconds: float, batch: int) -> None:
    import asyncio

    print(json.dumps(asyncio.run(_load(port, callers, seconds, batch))), flush=True)


def run_load(port: int, callers: int, seconds: float, batch: int = 0) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, __file__, "load", str(port), str(callers), str(seconds), str(batch)],
        capture_output=True, text=True, check=True, cwd=HERE,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the part ---------------------------------------------------------------------------


def best_of(repeat: int, port: dict[str, int], callers: int, seconds: float) -> dict[str, Any]:
    """Interleaved runs (bare, ours, bare, ours...): each server's best, by calls/s."""
    best: dict[str, Any] = {}
    for _ in range(repeat):
        for mode in ("bare", "ours"):
            run = run_load(port[mode], callers, seconds)
            if mode not in best or run["calls_per_s"] > best[mode]["calls_per_s"]:
                best[mode] = run
    return best


def bench_checkin(callers: list[int], seconds: float, batch: int, repeat: int) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fl-bench-checkin-") as name:
        servers = {"bare": Server("bare", Path(name)), "ours": Server("ours", Path(name))}
        try:
            print(f"{'callers':>7} {'bare calls/s':>12} {'ours calls/s':>12} {'ours/bare':>9} "
                  f"{'bare p50/p99 ms':>15} {'ours p50/p99 ms':>15}")  # fmt: skip
            ports = {mode: server.port for mode, server in servers.items()}
            for count in callers:
                best = best_of(repeat, ports, count, seconds)
                bare, ours = best["bare"], best["ours"]

                row = {"callers": count, "bare": bare, "ours": ours,
                       "ratio_to_bare": ours["calls_per_s"] / bare["calls_per_s"]}  # fmt: skip
                rows.append(row)
                print(f"{count:>7} {bare['calls_per_s']:>12.0f} {ours['calls_per_s']:>12.0f} "
                      f"{row['ratio_to_bare']:>9.2f} "
                      f"{bare['p50_ms']:>7.2f}/{bare['p99_ms']:<7.2f} "
                      f"{ours['p50_ms']:>7.2f}/{ours['p99_ms']:<7.2f}")  # fmt: skip
            batched = []
            print(f"\n{'callers':>7} {'per-client clients/s':>20} "
                  f"{'batched (x' + str(batch) + ') clients/s':>24} {'speed-up':>8}")  # fmt: skip
            for row in rows:
                result = run_load(servers["ours"].port, row["callers"], seconds, batch)
                single = row["ours"]["clients_per_s"]
                batched.append({"callers": row["callers"], "batch": batch, "ours": result,
                                "speedup": result["clients_per_s"] / single})  # fmt: skip
                print(f"{row['callers']:>7} {single:>20.0f} {result['clients_per_s']:>24.0f} "
                      f"{result['clients_per_s'] / single:>7.1f}x")  # fmt: skip
        finally:
            for server in servers.values():
                server.stop()
    return {"per_client": rows, "batched": batched}


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if sys.argv[1] == "serve":
        serve_main(sys.argv[2], Path(sys.argv[3]))
    else:
        load_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
