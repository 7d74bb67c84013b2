"""Logging set-up for the command line."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    # Third-party chatter that says nothing an operator can act on.
    for noisy in ("httpx", "httpcore", "trio-websocket", "hpack", "h2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
