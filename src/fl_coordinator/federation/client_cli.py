"""``fl-client``: run the reference client on a local data shard (``.npz`` with ``x`` and ``y``)."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio

from ..cli.running import run_until_signal
from ..errors import GaveUp, first_of
from ..logs import setup_logging
from ..rpc.addresses import BadAddress, split_address
from .client import Client, ClientOptions
from .training import Hyper

__all__ = ["build_parser", "main"]

log = logging.getLogger("fl_coordinator.client")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-client", description="Reference FL client.")
    parser.add_argument("--selector", default="127.0.0.1:50051", help="selector host:port")
    parser.add_argument("--data", type=Path, required=True, help=".npz file with arrays x and y")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where downloads and updates go (default: a temporary folder)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds to take part in")
    parser.add_argument("--epochs", type=int, default=Hyper.epochs, help="local epochs per round")
    parser.add_argument("--batch-size", type=int, default=Hyper.batch_size)
    parser.add_argument("--learning-rate", type=float, default=Hyper.learning_rate)
    parser.add_argument("--momentum", type=float, default=Hyper.momentum)

    parser.add_argument(
        "--max-refusals",
        type=int,
        default=100,
        help="refusals tolerated per round before giving up",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level.upper())
    try:
        split_address(args.selector)
    except BadAddress as error:
        print(f"fl-client: --selector: {error}", file=sys.stderr)
        return 2
    if not args.data.is_file():
        print(f"fl-client: --data={str(args.data)!r}: expected an .npz file", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fl-client-") as scratch:
        options = ClientOptions(
            selector=args.selector,
            data=args.data,
            work_dir=args.work_dir or Path(scratch),
            hyper=Hyper(args.epochs, args.batch_size, args.learning_rate, args.momentum),
            rounds=args.rounds,
            max_refusals=args.max_refusals,
        )
        client = Client(options)
        log.info("client of %s with %d samples", args.selector, len(client.y))

        try:
            trio.run(run_until_signal, client.run)
        except BaseExceptionGroup as group:
            gave_up = first_of(group, GaveUp)
            if gave_up is not None:
                log.error("%s", gave_up)
                return 1
            unreachable = first_of(group, OSError)  # refused, reset, no route, no such host
            if unreachable is None:
                raise
            log.error("selector %s cannot be reached: %s", args.selector, unreachable)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
