"""``serve(settings)``: the nursery that wires the coordinator together.

One nursery runs the round-state task, the purerpc gRPC server for selectors,
the websocket status server and, if configured, the webhook. Cancelling it
(Ctrl-C, SIGTERM, or a test leaving its block) stops all of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from .aggregation import Aggregator, aggregate
from .config import Settings
from .coordinator import Coordinator
from .grpc_server import serve_grpc
from .intra import IntraBatchServicer, IntraServicer
from .journal import next_round
from .layout import Layout
from .problem import check_problem, clean_tmp
from .status import StatusHub
from .webhook import run_webhook
from .websocket import PATH, StatusServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    """Where a started coordinator listens (ports resolved when 0 was asked for)."""

    host: str
    grpc_port: int
    status_port: int

    @property
    def status_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"ws://{host}:{self.status_port}{PATH}"


async def serve(
    settings: Settings,
    *,
    aggregator: Aggregator = aggregate,
    task_status: trio.TaskStatus[Endpoints] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one FL problem until cancelled. Raises ConfigError if it cannot start.

    ``aggregator`` is the averaging function run in a worker thread; tests and
    benchmarks pass a wrapped one to observe or pace it.
    """
    layout = Layout.from_settings(settings)
    check_problem(layout)
    clean_tmp(layout)
    first_round = next_round(layout, settings.keep_checkpoints)
    hub = StatusHub(settings.problem_id, str(layout.checkpoint))
    coordinator = Coordinator(settings, layout, hub, aggregator, first_round)

    async with trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        services = [IntraServicer(coordinator).service, IntraBatchServicer(coordinator).service]
        grpc_port = await nursery.start(serve_grpc, services, settings.host, settings.port)

        status_port = await nursery.start(
            StatusServer(hub).serve, settings.host, settings.status_port
        )
        if settings.webhook_url:
            await nursery.start(run_webhook, hub, settings.webhook_url)
        endpoints = Endpoints(settings.host, grpc_port, status_port)
        log.info(
            "problem %r: selectors at %s:%d (FlIntra), status stream at %s, root %s",
            settings.problem_id,
            settings.host,
            grpc_port,
            endpoints.status_url,
            layout.root,
        )
        task_status.started(endpoints)
