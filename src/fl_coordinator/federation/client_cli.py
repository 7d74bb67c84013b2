"""``fl-client``: run the reference client on a local data shard (``.npz`` with ``x`` and ``y``)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..cli.exits import exit_status
from ..cli.help import HelpFormatter
from ..errors import BadAddress, ConfigError
from ..logs import setup_logging

# trio, purerpc, numpy and h5py (about 0.5 s) are imported by build_parser and _run, inside
# exit_status: a Ctrl-C while they load is one line too.

__all__ = ["build_parser", "main"]

log = logging.getLogger("fl_coordinator.client")


def build_parser() -> argparse.ArgumentParser:
    from .training import Hyper

    parser = argparse.ArgumentParser(
        prog="fl-client", description="Reference FL client.", formatter_class=HelpFormatter
    )
    parser.add_argument("--selector", default="127.0.0.1:50051", help="selector host:port")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help=".npz file with x (one row per sample) and y (integer labels); see README",
    )
    parser.add_argument(
        "--selector-ca",
        type=Path,
        help="CA (PEM) of the selector's certificate: connect over TLS (its certificate must "
        "name the host of --selector)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="the problem's model.h5, to check --data against before the first check-in "
        "(without it: after the first download, before training)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where downloads and updates go (default: a temporary folder)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds to take part in")
    parser.add_argument("--epochs", type=int, default=Hyper.epochs, help="local epochs per round")
    parser.add_argument(
        "--batch-size", type=int, default=Hyper.batch_size, help="local training batch size"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=Hyper.learning_rate, help="SGD learning rate"
    )
    parser.add_argument("--momentum", type=float, default=Hyper.momentum, help="SGD momentum")
    parser.add_argument(
        "--max-refusals",
        type=int,
        default=100,
        help="refusals tolerated per round before giving up",
    )
    parser.add_argument(
        "--clip-norm",
        type=float,
        default=0.0,
        help="differential privacy: upload the update w_i - w clipped to this L2 norm, with "
        "weight 1 (0 = off: n * (w_i - w) with weight n, the Go wire's update)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return parser


def _run(args: argparse.Namespace) -> int:
    from ..cli.running import run_main
    from ..rpc.addresses import split_address
    from ..rpc.tls import client_context
    from .client import Client, ClientOptions
    from .training import Hyper

    setup_logging(args.log_level.upper())
    try:
        split_address(args.selector)
    except BadAddress:
        raise ConfigError("--selector", args.selector, "host:port") from None
    if not args.data.is_file():
        raise ConfigError("--data", str(args.data), "an .npz file")
    if args.model is not None and not args.model.is_file():
        raise ConfigError("--model", str(args.model), "the problem's model file (model.h5)")
    if not (math.isfinite(args.clip_norm) and args.clip_norm >= 0):
        raise ConfigError("--clip-norm", args.clip_norm, "a number >= 0 (0: off)")
    tls = None
    if args.selector_ca is not None:
        tls = client_context(str(args.selector_ca), ca_name="--selector-ca")
    with tempfile.TemporaryDirectory(prefix="fl-client-") as scratch:
        options = ClientOptions(
            selector=args.selector,
            data=args.data,
            work_dir=args.work_dir or Path(scratch),
            hyper=Hyper(args.epochs, args.batch_size, args.learning_rate, args.momentum),
            rounds=args.rounds,
            max_refusals=args.max_refusals,
            tls=tls,
            model=args.model,
            clip_norm=args.clip_norm,
        )
        client = Client(options)
        log.info("client of %s with %d samples", args.selector, len(client.y))
        run_main(client.run)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return exit_status("fl-client", lambda: _run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
