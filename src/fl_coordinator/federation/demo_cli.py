"""``fl-coordinator demo``: the flags of the local demo, parsed by the federation package itself.

The coordinator's command line hands ``demo`` and everything after it to
:func:`main` without importing this package first, so the operator commands
(``serve``, ``health``, ...) never load the demo's training settings, Keras
or scikit-learn.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..cli.exits import exit_status
from ..cli.help import HelpFormatter
from ..core.strategy import STRATEGIES
from ..logs import setup_logging
from .demo import DemoOptions, run_demo
from .training import Hyper

__all__ = ["build_parser", "main"]

_DEFAULTS = DemoOptions()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-coordinator demo",
        description="Run a whole federation on this machine (coordinator, selectors and "
        "clients as processes on 127.0.0.1), compared with centralized training.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--root", type=Path, default=_DEFAULTS.root, help="demo folder")
    parser.add_argument(
        "--selectors", type=int, default=_DEFAULTS.selectors, help="selector processes"
    )
    parser.add_argument("--clients", type=int, default=_DEFAULTS.clients, help="client processes")
    parser.add_argument("--rounds", type=int, default=_DEFAULTS.rounds, help="rounds to run")
    hyper = _DEFAULTS.hyper
    parser.add_argument("--epochs", type=int, default=hyper.epochs, help="local epochs per round")
    parser.add_argument(
        "--batch-size", type=int, default=hyper.batch_size, help="local training batch size"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=hyper.learning_rate, help="clients' SGD rate"
    )
    parser.add_argument(
        "--momentum", type=float, default=hyper.momentum, help="clients' SGD momentum"
    )
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="data split and test set")
    parser.add_argument(
        "--alpha",
        type=float,
        default=_DEFAULTS.alpha,
        help="Dirichlet concentration of the clients' label mix (smaller: more skewed)",
    )
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=_DEFAULTS.strategy,
        help="the coordinator's STRATEGY, with its documented defaults",
    )
    parser.add_argument(
        "--dp",
        type=float,
        default=None,
        metavar="Z",
        help="differential privacy with noise multiplier Z (0: clipped updates, no noise); "
        "the population is the demo's clients, all sampled each round",
    )
    parser.add_argument(
        "--clip-norm",
        type=float,
        default=_DEFAULTS.clip_norm,
        help="with --dp: the L2 norm clients clip their updates to",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("WARNING")
    options = DemoOptions(
        root=args.root,
        selectors=args.selectors,
        clients=args.clients,
        rounds=args.rounds,
        hyper=Hyper(args.epochs, args.batch_size, args.learning_rate, args.momentum),
        alpha=args.alpha,
        seed=args.seed,
        strategy=args.strategy,
        noise_multiplier=args.dp,
        clip_norm=args.clip_norm,
    )

    def run() -> int:
        run_demo(options)
        return 0

    return exit_status("fl-coordinator demo", run)
