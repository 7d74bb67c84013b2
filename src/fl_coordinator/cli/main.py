"""``fl-coordinator serve | init | rollback | demo | watch | health``: the command line.

Errors an operator can fix (a bad setting, a busy port, a missing file) end
the program with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import ConfigError, Settings, load_settings, read_config_file
from ..federation.training import Hyper
from ..logs import setup_logging
from ..storage.layout import Layout

log = logging.getLogger("fl_coordinator")

EXIT_USAGE = 2

#: Local training of the demo's clients (and of its centralized baseline).
DEMO_HYPER = Hyper()


def _load(config: Path | None) -> tuple[Settings, list[str]]:
    """Settings from ``config`` and the environment, and the file's unknown keys."""
    return load_settings(read_config_file(config) if config is not None else {})


def _settings(config: Path | None, **overrides: object) -> Settings:
    settings, unknown = _load(config)
    setup_logging(settings.log_level, settings.log_format)
    for key in unknown:
        log.warning("%s: unknown key %s ignored", config, key)
    return settings.replace(**{k: v for k, v in overrides.items() if v is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    from ..app import serve
    from ..storage.problem import init_problem, needs_init
    from .running import run_main

    settings = _settings(args.config)
    layout = Layout.from_settings(settings)
    if needs_init(layout):
        if layout.root.exists() and not layout.root.is_dir():
            raise ConfigError("FL_ROOT_PATH", str(layout.root), "a folder")
        log.info(
            "%s has no %s: initialising it with the built-in model",
            layout.root,
            settings.init_files_path,
        )
        init_problem(layout)
    error = run_main(functools.partial(serve, settings), ConfigError)
    if error is not None:
        raise error from None
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from ..storage.problem import InitError, init_problem

    root = str(args.root) if args.root is not None else None
    settings = _settings(args.config, fl_root_path=root)
    if args.model is not None and not args.model.is_file():
        raise ConfigError("--model", str(args.model), "an existing Keras model file")
    try:
        init_problem(Layout.from_settings(settings), args.model, force=args.force)
    except InitError as error:
        print(f"fl-coordinator init: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from ..storage.journal import history, rollback

    layout = Layout.from_settings(_settings(args.config))
    if args.round is None:
        kept = history(layout)
        print("kept checkpoints (round: file):" if kept else "no kept checkpoints")
        for number, path in kept.items():
            print(f"  {number}: {path}")
        return 0
    source = rollback(layout, args.round)
    log.info(
        "%s is now the checkpoint of round %d (%s); the next round continues the numbering",
        layout.checkpoint,
        args.round,
        source,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from ..federation.demo import DemoError, DemoOptions, run_demo
    except ImportError as error:
        print(
            f"fl-coordinator demo: {error.name} is missing; install the demo extra: "
            "pip install 'fl-coordinator[demo]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    setup_logging("WARNING")
    options = DemoOptions(
        root=args.root,
        selectors=args.selectors,
        clients=args.clients,
        rounds=args.rounds,
        hyper=Hyper(args.epochs, args.batch_size, args.learning_rate, args.momentum),
        seed=args.seed,
    )
    try:
        run_demo(options)
    except DemoError as error:
        print(f"fl-coordinator demo: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from ..status.websocket import PATH
    from .running import run_main
    from .watch import WatchError, watch

    settings, _ = _load(args.config)
    setup_logging("WARNING", settings.log_format)  # no "SIGINT received" line on Ctrl-C
    url = args.url or f"ws://127.0.0.1:{settings.status_port}{PATH}"
    token = args.token if args.token is not None else os.environ.get("STATUS_TOKEN") or None
    plain = True if args.plain else None
    error = run_main(functools.partial(watch, url, token, plain=plain, ca=args.ca), WatchError)
    if error is not None:
        print(f"fl-coordinator watch: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from .health import HealthError, Tls, check

    settings, _ = _load(args.config)
    address = args.address or f"127.0.0.1:{settings.port}"
    tls = None
    if args.ca is not None:
        # With mutual TLS on, the probe shows the coordinator's own certificate.
        mutual = bool(settings.tls_client_ca_file and settings.tls_cert_file)
        tls = Tls(
            args.ca,
            Path(settings.tls_cert_file) if mutual else None,
            Path(settings.tls_key_file) if mutual else None,
            args.server_name,
        )
    try:
        health = check(address, args.service, args.timeout, tls)
    except HealthError as error:
        print(f"fl-coordinator health: {error}", file=sys.stderr)
        return 1
    print(f"{address}: {health.name}")
    return 0 if health.serving else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-coordinator",
        description="Coordinator (master aggregator) of a hierarchical federated-learning system.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the coordinator of one FL problem")
    serve.add_argument("--config", type=Path, help="YAML file of KEY: value settings")
    serve.set_defaults(run=cmd_serve)

    init = commands.add_parser("init", help="prepare a problem folder (model and checkpoint)")
    init.add_argument("--root", type=Path, help="problem folder (default: FL_ROOT_PATH)")
    init.add_argument("--model", type=Path, help="Keras model file (default: built-in model)")
    init.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    init.add_argument("--config", type=Path, help="YAML file of KEY: value settings")
    init.set_defaults(run=cmd_init)

    back = commands.add_parser("rollback", help="restore the global checkpoint of a past round")
    back.add_argument("--round", type=int, help="round to restore (without it: list them)")
    back.add_argument("--config", type=Path, help="YAML file of KEY: value settings")
    back.set_defaults(run=cmd_rollback)

    watch = commands.add_parser("watch", help="follow the rounds of a running coordinator")
    watch.add_argument(
        "url", nargs="?", help="status stream (default: ws://127.0.0.1:STATUS_PORT/status)"
    )
    watch.add_argument(
        "--token", help="bearer token for the status stream (default: $STATUS_TOKEN)"
    )
    watch.add_argument("--plain", action="store_true", help="lines, even on a terminal")
    watch.add_argument("--ca", type=Path, help="CA (PEM) of a wss:// coordinator's certificate")

    watch.add_argument("--config", type=Path, help="YAML file of KEY: value settings")
    watch.set_defaults(run=cmd_watch)

    health = commands.add_parser(
        "health", help="exit 0 iff the coordinator's gRPC health service answers SERVING"
    )
    health.add_argument("--address", help="host:port (default: 127.0.0.1:PORT)")
    health.add_argument("--service", default="", help="service name (default: the server)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    health.add_argument(
        "--ca", type=Path, help="CA (PEM) of the coordinator's certificate: ask over TLS"
    )
    health.add_argument("--server-name", help="name in its certificate, if not the address's")

    health.add_argument("--config", type=Path, help="YAML file of KEY: value settings")
    health.set_defaults(run=cmd_health)

    demo = commands.add_parser("demo", help="run a whole federation on this machine")

    demo.add_argument("--root", type=Path, default=Path("demo"), help="demo folder (./demo)")
    demo.add_argument("--selectors", type=int, default=2)
    demo.add_argument("--clients", type=int, default=6)
    demo.add_argument("--rounds", type=int, default=10)
    demo.add_argument("--epochs", type=int, default=DEMO_HYPER.epochs, help="local epochs")
    demo.add_argument("--batch-size", type=int, default=DEMO_HYPER.batch_size)
    demo.add_argument("--learning-rate", type=float, default=DEMO_HYPER.learning_rate)
    demo.add_argument("--momentum", type=float, default=DEMO_HYPER.momentum)

    demo.add_argument("--seed", type=int, default=0, help="data split and initial model")
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"fl-coordinator {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
