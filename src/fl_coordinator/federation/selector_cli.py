"""``fl-selector serve``: run the reference selector."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..cli.exits import exit_status
from ..cli.help import HelpFormatter
from ..config import Settings, load_settings, warn_misspelt_environment
from ..errors import ConfigError, InputError
from ..logs import setup_logging
from ..storage.layout import Layout

# trio, purerpc, numpy and h5py (about 0.5 s) are imported in _serve, inside exit_status:
# a Ctrl-C while they load is one line too.

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-selector", description="Reference FL selector.", formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="hold clients and pre-aggregate their updates",
        description="Hold clients, send them initFiles/, sum their updates, report to the "
        "coordinator.",
        formatter_class=HelpFormatter,
    )
    serve.add_argument("--coordinator", default="127.0.0.1:50050", help="coordinator host:port")
    serve.add_argument(
        "--root",
        type=Path,
        default=None,
        help="shared folder of the FL problem (default: FL_ROOT_PATH)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="listen address")
    serve.add_argument("--port", type=int, default=50051, help="listen port (0 = any free)")
    serve.add_argument(
        "--advertise",
        default=None,
        help="host part of the selector id (no port: the port is --port's), as the coordinator "
        "dials it; needed when --host is a wildcard (default: --host)",
    )
    serve.add_argument(
        "--waiting-time-ms",
        type=int,
        default=20000,
        help="reconnection time told to refused clients",
    )
    serve.add_argument(
        "--hold-timeout",
        type=float,
        default=300.0,
        help="seconds a client is held waiting for the goal count",
    )
    serve.add_argument(
        "--report-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for uploads before aggregating what arrived",
    )
    serve.add_argument(
        "--per-client-checkin",
        action="store_true",
        help="one ClientCountUpdate per client, as the Go selector (default: batched "
        "CheckInClients, falling back to this when the coordinator does not serve it)",
    )
    serve.add_argument(
        "--clip-norm",
        type=float,
        default=None,
        help="differential privacy: refuse an upload whose weight is not 1 or whose L2 norm "
        "exceeds this (default: DP_CLIP_NORM; 0 = no check)",
    )
    tls = serve.add_argument_group(
        "security", "token: AUTH_TOKEN or AUTH_TOKEN_FILE in the environment, or --token-file"
    )
    tls.add_argument("--token-file", default=None, help="file holding the coordinator's token")
    tls.add_argument(
        "--coordinator-ca", default=None, help="CA (PEM) of the coordinator: dial it over TLS"
    )
    tls.add_argument(
        "--tls-cert",
        default=None,
        help="certificate (PEM) to serve over TLS and to present to a mutual-TLS coordinator",
    )
    tls.add_argument("--tls-key", default=None, help="private key (PEM) of --tls-cert")
    return parser


def _security_options(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The token and TLS contexts of SelectorOptions; ConfigError names the flag at fault."""
    from ..rpc.auth import load_token
    from ..rpc.tls import client_context, server_context

    if args.token_file is not None:
        settings = settings.replace(auth_token="", auth_token_file=args.token_file)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-key" if args.tls_cert else "--tls-cert", "", "both or neither")
    names = ("--tls-cert", "--tls-key")
    cert, key = args.tls_cert or "", args.tls_key or ""
    return {
        "token": load_token(settings),
        "coordinator_tls": (
            client_context(args.coordinator_ca, cert, key, ca_name="--coordinator-ca", names=names)
            if args.coordinator_ca
            else None
        ),
        "server_tls": server_context(cert, key, names=names) if cert else None,
    }


def _has_port(host: str) -> bool:
    """``host:port`` or ``[v6]:port`` (a bare IPv6 address has colons too, and no port)."""
    if host.startswith("["):
        return "]:" in host
    return host.count(":") == 1


def _serve(args: argparse.Namespace) -> int:
    from ..cli.running import run_main
    from ..rpc.addresses import split_address
    from .selector import Selector, SelectorOptions

    settings, _ = load_settings()
    if args.root is not None:
        settings = settings.replace(fl_root_path=str(args.root))
    try:
        split_address(args.coordinator)
    except InputError as error:
        raise ConfigError("--coordinator", args.coordinator, "host:port") from error
    if args.advertise is not None and _has_port(args.advertise):
        raise ConfigError(
            "--advertise", args.advertise, "a host name or address without a port (--port's)"
        )
    clip_norm = settings.dp_clip_norm if args.clip_norm is None else args.clip_norm
    if not (math.isfinite(clip_norm) and clip_norm >= 0):
        raise ConfigError("--clip-norm", clip_norm, "a number >= 0 (0: no check)")
    security = _security_options(args, settings)
    if not settings.root.is_dir():
        key = "--root" if args.root is not None else "FL_ROOT_PATH"
        raise ConfigError(key, settings.fl_root_path, "the problem's shared folder (it must exist)")
    setup_logging(settings.log_level, settings.log_format)
    warn_misspelt_environment()
    options = SelectorOptions(
        coordinator=args.coordinator,
        layout=Layout.from_settings(settings),
        host=args.host,
        port=args.port,
        advertise=args.advertise,
        waiting_time_ms=args.waiting_time_ms,
        hold_timeout=args.hold_timeout,
        report_timeout=args.report_timeout,
        batch_checkin=not args.per_client_checkin,
        clip_norm=clip_norm,
        **security,
    )
    run_main(Selector(options).serve)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_status("fl-selector", lambda: _serve(args))


if __name__ == "__main__":
    sys.exit(main())
