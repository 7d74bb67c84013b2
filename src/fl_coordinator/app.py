"""``serve(settings)``: the nursery that wires the coordinator together.

One nursery runs the round-state task, the purerpc gRPC server for selectors
(with the health service), the websocket status server, the metrics (and, if
``METRICS_PORT`` is set, their HTTP endpoint) and, if configured, the webhook.
Cancelling it (Ctrl-C, SIGTERM, or a test leaving its block) stops all of
them. TLS contexts and the token are loaded before anything listens, so an
unusable certificate stops the start-up with one line.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import trio

from .config import Settings
from .connections import ConnectionLimits, descriptor_budget
from .coordinator import Coordinator
from .rpc.auth import TokenGuard, load_token
from .rpc.health import HealthServicer, checkpoint_readable
from .rpc.listener import serve_grpc
from .rpc.servicers import CheckIns, IntraBatchServicer, IntraServicer
from .rpc.tls import grpc_server_context, status_server_context, warn_if_exposed
from .status.hub import StatusHub
from .status.metrics import Metrics
from .status.metrics_endpoint import PATH as METRICS_PATH
from .status.metrics_endpoint import serve_metrics
from .status.webhook import run_webhook
from .status.websocket import PATH, StatusLimits, StatusServer
from .storage.aggregation import Aggregator, aggregate
from .storage.journal import next_round
from .storage.layout import Layout
from .storage.problem import check_problem, clean_tmp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    """Where a started coordinator listens (ports resolved when 0 was asked for)."""

    host: str
    grpc_port: int
    status_port: int
    metrics_port: int | None = None  # None: metrics not served
    tls: bool = False

    @property
    def status_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self._local_host}:{self.status_port}{PATH}"

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_port is None:
            return None
        return f"http://{self._local_host}:{self.metrics_port}{METRICS_PATH}"

    @property
    def _local_host(self) -> str:
        """An address to reach the servers at (the loopback one for a wildcard address)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host


def _connection_limits(settings: Settings) -> ConnectionLimits:
    """The settings' limits, with MAX_CONNECTIONS lowered to each port's share of descriptors."""
    ports = 2 if settings.metrics_port is None else 3
    share = descriptor_budget() // ports
    if share < settings.max_connections:
        log.info(
            "RLIMIT_NOFILE leaves descriptors for %d connections per port (MAX_CONNECTIONS=%d)",
            share,
            settings.max_connections,
        )
    return ConnectionLimits(
        max_connections=min(settings.max_connections, share),
        idle_timeout=settings.idle_connection_timeout or None,
        handshake_timeout=settings.handshake_timeout,
    )


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
    grpc_tls = grpc_server_context(settings)
    status_tls = status_server_context(settings)
    token = load_token(settings)
    hub = StatusHub(settings.problem_id, str(layout.checkpoint))
    metrics = Metrics(settings.problem_id)
    coordinator = Coordinator(settings, layout, hub, metrics.measured(aggregator), first_round)
    connection_limits = _connection_limits(settings)
    status_server = StatusServer(
        hub,
        StatusLimits(
            token=settings.status_token,
            max_subscribers=settings.max_status_subscribers,
            max_message_bytes=settings.status_max_message_bytes,
            connections=connection_limits,
        ),
        status_tls,
    )
    metrics.count_subscribers(lambda: status_server.connected)

    async def healthy() -> bool:
        return coordinator.alive and await checkpoint_readable(layout.checkpoint)

    check_ins = CheckIns(coordinator, answered=metrics.checked_in)
    services = [
        IntraServicer(coordinator, check_ins).service,
        IntraBatchServicer(check_ins).service,
        HealthServicer(healthy).service,
    ]
    guard = TokenGuard(token) if token else None
    async with trio.open_nursery() as nursery:
        if guard:
            nursery.start_soon(guard.throttle.run)
        await nursery.start(metrics.follow, hub)
        await nursery.start(coordinator.run)
        grpc_port = await nursery.start(
            functools.partial(
                serve_grpc,
                services,
                settings.host,
                settings.port,
                ssl_context=grpc_tls,
                check=guard.check if guard else None,
                max_message_bytes=settings.grpc_max_message_bytes,
                limits=connection_limits,
            )
        )
        status_port = await nursery.start(status_server.serve, settings.host, settings.status_port)
        metrics_port = None
        if settings.metrics_port is not None:
            serve_metrics_here = functools.partial(serve_metrics, limits=connection_limits)
            metrics_port = await nursery.start(
                serve_metrics_here, metrics.render, settings.host, settings.metrics_port
            )
        if settings.webhook_url:
            await nursery.start(
                functools.partial(run_webhook, failed=metrics.webhook_failed),
                hub,
                settings.webhook_url,
            )
        warn_if_exposed("the gRPC server", settings.host, grpc_tls)
        warn_if_exposed("the status stream", settings.host, status_tls)
        endpoints = Endpoints(
            settings.host, grpc_port, status_port, metrics_port, tls=status_tls is not None
        )
        log.info(
            "problem %r: selectors at %s:%d (FlIntra), status stream at %s, metrics at %s, root %s",
            settings.problem_id,
            settings.host,
            grpc_port,
            endpoints.status_url,
            endpoints.metrics_url or "(off)",
            layout.root,
        )
        task_status.started(endpoints)
