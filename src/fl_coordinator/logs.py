"""Logging set-up for the command line."""

from __future__ import annotations

import logging
import sys

#: Loggers kept at WARNING or above whatever LOG_LEVEL says.
NOISY = ("httpx", "httpcore", "trio-websocket", "hpack", "h2")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    # Third-party chatter that says nothing an operator can act on. hpack and h2
    # also log raw HTTP/2 headers at DEBUG, bearer tokens included: they stay at
    # WARNING even with LOG_LEVEL=DEBUG.
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
