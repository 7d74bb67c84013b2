"""``fl-coordinator serve | init | rollback | demo | watch | health``: the command line.

Each command imports what it uses when it runs, not before: ``health`` (the
container's health check, run every few seconds) and ``serve`` load neither
Keras nor the federation package. Errors an operator can fix are
:class:`~fl_coordinator.errors.OperatorError`: caught once, in :func:`main`,
printed as one line on stderr, and the program exits with the error's
``exit_status`` (2 for settings and folders, 1 when a client tool could not
do its job), never with a traceback.

The settings, the logging set-up and the help formatter are imported inside
:func:`~.exits.exit_status` too, and the command line is parsed there: a
Ctrl-C is one line, not a traceback, from the moment this module's own imports
(the standard library's, the exceptions) are done, about 50 ms after the
interpreter starts; before that, Python's own handler answers it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ..errors import ConfigError
from .exits import exit_status

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["build_parser", "main"]

log = logging.getLogger("fl_coordinator")


def _load(config: Path | None) -> tuple[Settings, list[str]]:
    """Settings from ``config`` and the environment, and the file's unknown keys."""
    from ..config import load_settings, read_config_file

    return load_settings(read_config_file(config) if config is not None else {})


def _settings(config: Path | None, **overrides: object) -> Settings:
    from ..config import similar_key, warn_misspelt_environment
    from ..logs import setup_logging

    settings, unknown = _load(config)
    setup_logging(settings.log_level, settings.log_format)
    for key in unknown:
        close = similar_key(key)
        hint = f" (did you mean {close}?)" if close else ""
        log.warning("%s: unknown key %s ignored%s", config, key, hint)
    warn_misspelt_environment()
    return settings.replace(**{k: v for k, v in overrides.items() if v is not None})


def _serve(args: argparse.Namespace) -> int:
    from ..app import serve
    from ..storage.layout import Layout
    from ..storage.problem import open_root
    from .running import run_main

    settings = _settings(args.config)
    open_root(Layout.from_settings(settings), init_if_empty=args.init_if_empty)
    run_main(functools.partial(serve, settings, take_over=args.take_over))
    return 0


def _init(args: argparse.Namespace) -> int:
    from ..storage.layout import Layout
    from ..storage.ownership import ensure_not_served
    from ..storage.problem import init_problem

    root = str(args.root) if args.root is not None else None
    settings = _settings(args.config, fl_root_path=root)
    if args.model is not None and not args.model.is_file():
        raise ConfigError("--model", str(args.model), "an existing Keras model file")
    layout = Layout.from_settings(settings)
    ensure_not_served(layout, "init")
    init_problem(layout, args.model, force=args.force)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from ..storage.journal import history, rollback
    from ..storage.layout import Layout
    from ..storage.ownership import ensure_not_served
    from ..storage.round_files import kept_metrics
    from ..storage.strategy_state import state_path

    root = str(args.root) if args.root is not None else None
    settings = _settings(args.config, fl_root_path=root)
    layout = Layout.from_settings(settings)
    if not layout.root.is_dir():
        key = "--root" if root is not None else "FL_ROOT_PATH"
        raise ConfigError(key, str(layout.root), "an existing problem folder")
    if args.round is None:
        kept = history(layout)
        where = layout.own / "history"
        if not kept:
            print(
                f"no kept checkpoints in {where} (is {layout.root} the problem's folder? a "
                f"coordinator keeps the last KEEP_CHECKPOINTS={settings.keep_checkpoints})"
            )
        else:
            print(f"kept checkpoints in {where} (round: file, metrics):")
        for number, path in kept.items():
            print(f"  {number}: {path}{kept_metrics(layout, number)}")
        return 0
    ensure_not_served(layout, "rollback")
    source = rollback(layout, args.round)
    state = state_path(layout, args.round)
    log.info(
        "%s is now the checkpoint of round %d (%s); the next round continues the numbering; "
        "optimizer state: %s",
        layout.checkpoint,
        args.round,
        source,
        f"round {args.round}'s ({state})" if state.exists() else "none kept for that round",
    )
    return 0


def _demo(argv: Sequence[str]) -> int:
    try:
        from ..federation.demo_cli import main as demo
    except ImportError as error:
        print(
            f"fl-coordinator demo: {error.name} is missing; install the demo extra: "
            "pip install 'fl-coordinator[demo]'",
            file=sys.stderr,
        )
        return ConfigError.exit_status
    return demo(argv)


def _watch(args: argparse.Namespace) -> int:
    from ..logs import setup_logging
    from ..status.websocket import PATH
    from .running import run_main
    from .watch import watch

    settings, _ = _load(args.config)
    setup_logging("WARNING", settings.log_format)  # no "SIGINT received" line on Ctrl-C
    url = args.url or f"ws://127.0.0.1:{settings.status_port}{PATH}"
    token = args.token if args.token is not None else os.environ.get("STATUS_TOKEN") or None
    plain = True if args.plain else None
    run_main(functools.partial(watch, url, token, plain=plain, ca=args.ca))
    return 0


def _health(args: argparse.Namespace) -> int:
    from .health import Tls, probe

    settings, _ = _load(args.config)
    address = args.address or f"127.0.0.1:{settings.port}"
    if (args.cert is None) != (args.key is None):
        raise ConfigError("--cert" if args.key else "--key", "", "--cert and --key together")
    tls = None
    if args.ca is not None:
        # A client certificate for a mutual-TLS coordinator: the one given, else the
        # coordinator's own where it is set (in its pod), whether or not this host's
        # settings also name TLS_CLIENT_CA_FILE (an operator host's need not).
        cert, key = args.cert, args.key
        if cert is None and settings.tls_cert_file:
            cert, key = Path(settings.tls_cert_file), Path(settings.tls_key_file)
        tls = Tls(args.ca, cert, key, args.server_name)
    health = probe(address, args.service, args.timeout, tls)
    print(f"{address}: {health.name}")
    return 0 if health.serving else 1


#: Longest --timeout of a health probe, in seconds (a day): from about 9e9 s on, gRPC's
#: deadline (now + timeout, in int64 nanoseconds) overflowed into one already past.
_MAX_SECONDS = 86_400.0


def _seconds(text: str) -> float:
    """A flag's number of seconds, > 0 and at most _MAX_SECONDS (argparse's float takes -1,
    nan, inf and 1e10: a health probe with one failed at once, as DEADLINE_EXCEEDED, as if
    the coordinator were too slow)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= _MAX_SECONDS:  # nan compares false
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds > 0 and at most {_MAX_SECONDS:,.0f}, not {text!r}"
        )
    return seconds


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of KEY: value settings")


def build_parser() -> argparse.ArgumentParser:
    from .help import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="fl-coordinator",
        description="Coordinator (master aggregator) of a hierarchical federated-learning system.",
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    # Every command's --help shows its options' defaults.
    commands.add_parser = functools.partial(  # type: ignore[method-assign]
        commands.add_parser, formatter_class=HelpFormatter
    )

    serve = commands.add_parser("serve", help="run the coordinator of one FL problem")
    serve.add_argument(
        "--take-over",
        action="store_true",
        help="take the problem folder over from a coordinator whose ownership lease is stale "
        "(it died on another host, hangs or is cut off)",
    )
    serve.add_argument(
        "--init-if-empty",
        action="store_true",
        help="initialise a problem folder that has no initFiles/ (or does not exist) with the "
        "built-in model, as init would; without it such a folder is refused",
    )
    _config_flag(serve)
    serve.set_defaults(run=_serve)

    init = commands.add_parser("init", help="prepare a problem folder (model and checkpoint)")
    init.add_argument("--root", type=Path, help="problem folder (default: FL_ROOT_PATH)")
    init.add_argument("--model", type=Path, help="Keras model file (default: built-in model)")
    init.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    _config_flag(init)
    init.set_defaults(run=_init)

    back = commands.add_parser("rollback", help="restore the global checkpoint of a past round")
    back.add_argument("--root", type=Path, help="problem folder (default: FL_ROOT_PATH)")
    back.add_argument("--round", type=int, help="round to restore (without it: list them)")
    _config_flag(back)
    back.set_defaults(run=_rollback)

    watch = commands.add_parser("watch", help="follow the rounds of a running coordinator")
    watch.add_argument(
        "url", nargs="?", help="status stream (default: ws://127.0.0.1:STATUS_PORT/status)"
    )
    watch.add_argument(
        "--token", help="bearer token for the status stream (default: $STATUS_TOKEN)"
    )
    watch.add_argument("--plain", action="store_true", help="lines, even on a terminal")
    watch.add_argument("--ca", type=Path, help="CA (PEM) of a wss:// coordinator's certificate")
    _config_flag(watch)
    watch.set_defaults(run=_watch)

    health = commands.add_parser(
        "health", help="exit 0 iff the coordinator's gRPC health service answers SERVING"
    )
    health.add_argument("--address", help="host:port (default: 127.0.0.1:PORT)")
    health.add_argument("--service", default="", help="service name (default: the server)")
    health.add_argument(
        "--timeout", type=_seconds, default=5.0, help="seconds to wait for the answer (> 0)"
    )
    health.add_argument(
        "--ca", type=Path, help="CA (PEM) of the coordinator's certificate: ask over TLS"
    )
    health.add_argument("--server-name", help="name in its certificate, if not the address's")
    health.add_argument(
        "--cert",
        type=Path,
        help="client certificate (PEM) for a mutual-TLS coordinator (default: TLS_CERT_FILE)",
    )
    health.add_argument("--key", type=Path, help="its private key (PEM) (default: TLS_KEY_FILE)")
    _config_flag(health)
    health.set_defaults(run=_health)

    # Listed here for --help; its flags belong to the federation package (see main).
    commands.add_parser(
        "demo",
        help="run a whole federation on this machine (fl-coordinator demo --help for its flags)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # its flags are the federation package's, and so is its parser
        return exit_status("fl-coordinator demo", lambda: _demo(argv[1:]))
    # Named after the program until the command is known. --help's SystemExit and a usage
    # error's pass through exit_status, as argparse means them to.
    return exit_status("fl-coordinator", lambda: _run(argv))


def _run(argv: list[str]) -> int:
    """The command ``argv`` names: parsed, then run under its own name."""
    args = build_parser().parse_args(argv)
    return exit_status(f"fl-coordinator {args.command}", lambda: args.run(args))


def entry() -> NoReturn:
    """The ``fl-coordinator`` program: :func:`main`, then the process's end.

    An averaging pass abandoned while it waited on a selector's storage (see
    :mod:`..storage.pass_control`) may still hold HDF5 files open in a thread
    that waits: HDF5's exit handler would close them through Python after
    Python's end, and crash the process (SIGSEGV). Such a pass is given
    :data:`_LAST_WAIT` seconds to end (a pass only stopped ends at its next
    step); if it has not, the process ends without the interpreter's teardown,
    once its output is flushed.
    """
    status = main()
    from ..storage.pass_control import given_up

    deadline = time.monotonic() + _LAST_WAIT  # for all of them, not each
    for control in given_up():
        control.finished.wait(max(0.0, deadline - time.monotonic()))
    if waiting := given_up():
        waits = [control.stuck or control.overdue(0) for control in waiting]
        logging.getLogger(__name__).warning(
            "%d averaging pass(es) abandoned still wait on a selector's storage (%s): "
            "ending without HDF5's exit handler",
            len(waiting),
            ", ".join(str(wait.path) if wait else "no call marked" for wait in waits),
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


#: Seconds an abandoned averaging pass is given to end when the program ends.
_LAST_WAIT = 2.0

if __name__ == "__main__":
    entry()
