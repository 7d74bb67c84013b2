"""``serve(settings)``: the composition root that wires the coordinator together.

This is the one place that reads :class:`~.config.Settings` as a whole. It
turns them into the small values each part needs (the round's rules, TLS
contexts, the retry policy, the status stream's limits), builds the I/O the
round task is handed (the problem folder, the ``GoalCountReached`` client),
and runs everything in one nursery: the round task, the purerpc gRPC server
for selectors (with the health service), the websocket status server, the
metrics (and, if ``METRICS_PORT`` is set, their HTTP endpoint) and, if
configured, the webhook and the legacy status push. Cancelling it (Ctrl-C,
SIGTERM, or a test leaving its block) stops all of them. TLS contexts and the
token are loaded before anything listens, so an unusable certificate stops the
start-up with one line.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from .config import Settings
from .connections import ConnectionLimits, port_share
from .coordinator import Coordinator
from .core.privacy import DifferentialPrivacy, Spent
from .core.rounds import Rules
from .core.stopping import RoundMetrics, StopWhen
from .core.strategy import Combination, ServerOptimizer, Strategy
from .evaluation import Evaluator
from .retry import RetryPolicy
from .rpc.auth import TokenGuard, load_token
from .rpc.goal_count import GoalCountClient
from .rpc.health import HealthServicer, checkpoint_readable
from .rpc.listener import serve_grpc
from .rpc.request_limits import small_requests
from .rpc.servicers import CheckIns, IntraBatchServicer, IntraServicer
from .rpc.tls import (
    grpc_server_context,
    selector_client_context,
    status_server_context,
    warn_if_exposed,
)
from .status.hub import StatusHub
from .status.legacy_push import run_legacy_push
from .status.metrics import Metrics
from .status.metrics_endpoint import PATH as METRICS_PATH
from .status.metrics_endpoint import serve_metrics
from .status.webhook import run_webhook
from .status.websocket import PATH, StatusLimits, StatusServer
from .storage.aggregation import Aggregator, aggregate
from .storage.checkpoint import read_checkpoint_plan
from .storage.journal import next_round, read_journal
from .storage.layout import Layout
from .storage.ownership import hold_ownership
from .storage.privacy_ledger import PrivacyLedger, ledger_path
from .storage.problem import check_problem, clean_tmp
from .storage.round_files import RoundFiles
from .storage.round_log import RoundLog
from .storage.strategy_state import check_fit, check_strategy
from .storage.weights import Weight, describe

__all__ = ["Endpoints", "build_coordinator", "privacy_ledger", "serve"]

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
        """Where a process on this machine reaches the status stream."""
        return self.status_url_at(self._local_host)

    @property
    def metrics_url(self) -> str | None:
        return self.metrics_url_at(self._local_host)

    def status_url_at(self, host: str) -> str:
        return f"{'wss' if self.tls else 'ws'}://{_url_host(host)}:{self.status_port}{PATH}"

    def metrics_url_at(self, host: str) -> str | None:
        if self.metrics_port is None:
            return None
        return f"http://{_url_host(host)}:{self.metrics_port}{METRICS_PATH}"

    @property
    def wildcard(self) -> bool:
        """Listening on every address of this machine (``0.0.0.0``, ``::``)."""
        return self.host in ("0.0.0.0", "::", "")

    @property
    def _local_host(self) -> str:
        """An address to reach the servers at (the loopback one for a wildcard address)."""
        return "127.0.0.1" if self.wildcard else self.host


def _url_host(host: str) -> str:
    """``host`` as a URL's authority writes it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def _started_line(problem: str, endpoints: Endpoints, root: Path) -> str:
    """What the coordinator listens on, as it listens: the addresses it was given.

    A wildcard address is shown as it is, with this machine's name, the one
    selectors and the webserver on other machines would use (the loopback
    address it used to show is reachable from this machine only).
    """
    host = endpoints.host or "0.0.0.0"
    line = (
        f"problem {problem!r}: selectors at {_url_host(host)}:{endpoints.grpc_port} (FlIntra), "
        f"status stream at {endpoints.status_url_at(host)}, "
        f"metrics at {endpoints.metrics_url_at(host) or '(off)'}, root {root}"
    )
    if endpoints.wildcard:
        line += f" ({host}: every address of this machine, e.g. {socket.gethostname()})"
    return line


def _round_rules(settings: Settings, strategy: Strategy) -> Rules:
    """The goal, windows and admission rules of every round, and when the run ends."""
    return Rules(
        goal=settings.checkin_limit,
        selection_timeout=settings.selection_timeout,
        min_checkin_fraction=settings.min_checkin_fraction,
        reporting_timeout=settings.reporting_timeout,
        min_reporting_fraction=settings.min_reporting_fraction,
        allowed=frozenset(settings.allowed_selectors),
        max_selectors=settings.max_selectors_per_round,
        min_selectors=strategy.combination.min_selectors,
        rounds=settings.rounds,
        stop_when=StopWhen.parse(settings.stop_when) if settings.stop_when else None,
        evaluate=bool(settings.evaluate),
        dp_clip_norm=settings.dp_clip_norm if strategy.privacy is not None else 0.0,
        max_epsilon=settings.dp_max_epsilon,
    )


def _strategy(settings: Settings) -> Strategy:
    """What each round's aggregation computes (STRATEGY and its keys, the combination)."""
    return Strategy(
        ServerOptimizer.of(
            settings.strategy,
            settings.server_learning_rate,
            settings.tau,
            momentum=settings.server_momentum,
            beta_1=settings.beta_1,
            beta_2=settings.beta_2,
        ),
        Combination(
            settings.robust_aggregation, settings.trim_fraction, settings.selector_clip_norm
        ),
        _privacy(settings),
    )


def _privacy(settings: Settings) -> DifferentialPrivacy | None:
    """Client-level differential privacy (None: DP_NOISE_MULTIPLIER is 0)."""
    if not settings.dp_noise_multiplier:
        return None
    return DifferentialPrivacy(
        settings.dp_noise_multiplier,
        settings.dp_clip_norm,
        denominator=settings.checkin_limit,
        population=settings.dp_population,
        delta=settings.dp_delta,
        max_epsilon=settings.dp_max_epsilon,
    )


def privacy_ledger(settings: Settings, layout: Layout) -> tuple[PrivacyLedger, Spent] | None:
    """The problem's privacy ledger and what it says was spent (None: DP is off).

    Blocking (reads the ledger, runs the accountant: about a second the first
    time, for the import): call it from a worker thread. Raises ProblemError for
    a ledger that cannot be read.
    """
    privacy = _privacy(settings)
    if privacy is None:
        if ledger_path(layout).exists():
            log.warning(
                "%s lists rounds released under differential privacy; with "
                "DP_NOISE_MULTIPLIER=0 the rounds that follow are not private (the ledger is "
                "kept: setting DP on again goes on from what it says)",
                ledger_path(layout),
            )
        return None
    ledger = PrivacyLedger(layout, privacy)
    ledger.load()
    return ledger, ledger.spent()


def _goal_count_retry(settings: Settings) -> RetryPolicy:
    """GOAL_COUNT_RETRIES retries after the first call, waits of 1 s, 2 s, 4 s, ... plus jitter."""
    return RetryPolicy(attempts=settings.goal_count_retries + 1, first_wait=1.0)


def build_coordinator(
    settings: Settings,
    layout: Layout,
    hub: StatusHub,
    *,
    aggregator: Aggregator = aggregate,
    first_round: int = 1,
    plan: Sequence[Weight] | None = None,
    privacy: tuple[PrivacyLedger, Spent] | None = None,
) -> Coordinator:
    """The round task of ``settings``' problem, with its I/O. Raises ConfigError (TLS files).

    ``plan``: the global checkpoint's weight arrays, which every selector's
    files are checked against (None: read from the checkpoint now). Raises
    ConfigError for a strategy the checkpoint cannot take, or that is not the
    one whose optimizer state belongs to it (see :mod:`.storage.strategy_state`).
    ``privacy``: :func:`privacy_ledger`'s answer (None: computed here, blocking,
    when differential privacy is on).
    """
    tell = GoalCountClient(settings.goal_count_timeout, selector_client_context(settings))
    plan = read_checkpoint_plan(layout.checkpoint) if plan is None else tuple(plan)
    strategy = _strategy(settings)
    check_fit(strategy, plan)
    if privacy is None and strategy.privacy is not None:
        privacy = privacy_ledger(settings, layout)
    ledger, spent = privacy if privacy is not None else (None, None)
    files = RoundFiles(
        layout,
        plan,
        aggregator=aggregator,
        keep=settings.keep_checkpoints,
        lock_patience=settings.reporting_timeout,
        check_timeout=settings.check_timeout,
        check_workers=settings.check_workers,
        strategy=strategy,
        state=check_strategy(layout, strategy.optimizer, plan),
        evaluated=bool(settings.evaluate),
        privacy=ledger,
    )
    entry = read_journal(layout)
    evaluator = (
        Evaluator(settings.evaluate, layout.model, settings.evaluate_timeout)
        if settings.evaluate
        else None
    )
    log.info("strategy: %s", strategy.describe())
    if spent is not None:
        log.info(
            "privacy spent by %d released round(s): epsilon=%.4g at delta=%g",
            spent.rounds,
            spent.epsilon,
            spent.delta,
        )
    return Coordinator(
        _round_rules(settings, strategy),
        files,
        hub,
        tell=tell,
        retry=_goal_count_retry(settings),
        first_round=first_round,
        metrics=RoundMetrics.from_dict(entry.metrics) if entry and entry.metrics else None,
        evaluator=evaluator,
        privacy=spent,
    )


def _connection_limits(settings: Settings) -> ConnectionLimits:
    """The settings' limits, with MAX_CONNECTIONS lowered to each port's share of descriptors."""
    ports = 2 if settings.metrics_port is None else 3
    share = port_share(ports)
    if share.connections < settings.max_connections:
        log.info(
            "RLIMIT_NOFILE leaves descriptors for %d connections per port (MAX_CONNECTIONS=%d), "
            "and %d closing to make room",
            share.connections,
            settings.max_connections,
            share.closing,
        )
    return ConnectionLimits(
        max_connections=min(settings.max_connections, share.connections),
        max_closing=share.closing,
        idle_timeout=settings.idle_connection_timeout or None,
        handshake_timeout=settings.handshake_timeout,
    )


async def serve(
    settings: Settings,
    *,
    aggregator: Aggregator = aggregate,
    take_over: bool = False,
    task_status: trio.TaskStatus[Endpoints] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one FL problem until cancelled. Raises an OperatorError if it cannot start,
    or if another coordinator takes the problem folder over.

    ``aggregator`` is the averaging function run in a worker thread; tests and
    benchmarks pass a wrapped one to observe or pace it. ``take_over``: take
    the folder over from a coordinator whose ownership lease is stale (see
    :mod:`.storage.ownership`).
    """
    layout = Layout.from_settings(settings)
    plan = check_problem(layout)
    grpc_tls = grpc_server_context(settings)
    status_tls = status_server_context(settings)
    token = load_token(settings)
    async with trio.open_nursery() as nursery:
        # Nothing in the folder is touched before this process owns it.
        await nursery.start(functools.partial(hold_ownership, layout, take_over=take_over))
        log.info(
            "%s: %d weight array(s) to average (%s)", layout.checkpoint, len(plan), describe(plan)
        )
        clean_tmp(layout)
        first_round = next_round(layout, settings.keep_checkpoints)
        hub = StatusHub(settings.problem_id, str(layout.checkpoint))
        round_log = await trio.to_thread.run_sync(RoundLog, layout, settings.round_history)
        hub.observe(round_log.observe)
        nursery.start_soon(round_log.run)
        metrics = Metrics(settings.problem_id)
        privacy = await trio.to_thread.run_sync(privacy_ledger, settings, layout)
        coordinator = build_coordinator(
            settings,
            layout,
            hub,
            aggregator=metrics.measured(aggregator),
            first_round=first_round,
            plan=plan,
            privacy=privacy,
        )
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
            problem_id=settings.problem_id,
            rounds=round_log.newest,
        )
        metrics.count_subscribers(lambda: status_server.connected)

        async def healthy() -> bool:
            if not coordinator.alive or coordinator.storage_error is not None:
                return False  # the round task is gone, or its own files cannot be written
            return await checkpoint_readable(layout.checkpoint)

        check_ins = CheckIns(coordinator, count=metrics.checked_in)
        selector_services = [
            IntraServicer(check_ins).service,
            IntraBatchServicer(check_ins).service,
        ]
        health = HealthServicer(healthy, served=[s.name for s in selector_services])
        services = [*selector_services, health.service]
        guard = TokenGuard(token) if token else None
        if guard:
            nursery.start_soon(guard.throttle.run)
        await nursery.start(metrics.follow, hub)
        if settings.legacy_status_push:  # subscribed before the first round opens
            await nursery.start(
                functools.partial(run_legacy_push, dropped=metrics.legacy_push_dropped),
                hub,
                settings.webserver_address,
            )
        await nursery.start(coordinator.run)
        grpc_port = await nursery.start(
            functools.partial(
                serve_grpc,
                services,
                settings.host,
                settings.port,
                ssl_context=grpc_tls,
                guard=guard,
                max_message_bytes=settings.grpc_max_message_bytes,
                max_buffered_bytes=settings.grpc_max_buffered_bytes,
                request_limits=small_requests(services),  # all of them: ids and counts
                limits=connection_limits,
                elsewhere=(
                    "for selectors: the status stream (wss://) and its pages (https://) are "
                    "on the coordinator's STATUS_PORT"
                ),
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
        log.info("%s", _started_line(settings.problem_id, endpoints, layout.root))
        task_status.started(endpoints)
