"""Optional webhook: every status message is also POSTed as JSON (``WEBHOOK_URL``).

The webhook reads the hub like any other subscriber, so a slow or dead
endpoint only costs its own queue (oldest messages dropped) and never blocks
the round. Each message is tried a few times with exponential back-off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import trio

from .hub import StatusHub, StatusMessage

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0


@dataclass(frozen=True)
class Retry:
    """How hard to try one message: attempts, and the first pause (doubling after each)."""

    attempts: int = 4
    first_backoff: float = 0.5


async def post_with_retries(
    client: httpx.AsyncClient, url: str, message: StatusMessage, retry: Retry
) -> bool:
    """POST ``message``; retry on network errors and 5xx. Return whether it was delivered."""
    delay = retry.first_backoff
    for attempt in range(1, retry.attempts + 1):
        try:
            response = await client.post(url, json=message, timeout=REQUEST_TIMEOUT)
            if response.status_code < 500:
                if response.is_error:
                    log.warning(
                        "webhook %s refused status seq=%s: HTTP %d",
                        url,
                        message["seq"],
                        response.status_code,
                    )
                    return False
                return True
            problem = f"HTTP {response.status_code}"
        except httpx.HTTPError as error:
            problem = f"{type(error).__name__}: {error}"
        if attempt < retry.attempts:
            log.debug("webhook attempt %d failed (%s); retrying in %.1f s", attempt, problem, delay)
            await trio.sleep(delay)
            delay *= 2
    log.warning(
        "webhook %s: gave up on status seq=%s after %d attempts (%s)",
        url,
        message["seq"],
        retry.attempts,
        problem,
    )
    return False


def _ignore() -> None:
    pass


async def run_webhook(
    hub: StatusHub,
    url: str,
    retry: Retry = Retry(),
    *,
    failed: Callable[[], None] = _ignore,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Deliver the hub's messages to ``url`` until cancelled (started once subscribed).

    ``failed()`` is called for each message given up on (metrics).
    """
    async with httpx.AsyncClient() as client:
        with hub.subscribe() as subscription:
            task_status.started()
            while True:
                message = await subscription.get()
                if not await post_with_retries(client, url, message, retry):
                    failed()
