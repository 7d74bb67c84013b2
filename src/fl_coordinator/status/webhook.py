"""Optional webhook: every status message is also POSTed as JSON (``WEBHOOK_URL``).

The webhook reads the hub like any other subscriber, so a slow or dead
endpoint only costs its own queue (oldest messages dropped) and never blocks
the round. Each message is tried a few times (network errors and HTTP 5xx),
with the coordinator's one :class:`~fl_coordinator.retry.RetryPolicy`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
import trio

from ..errors import short_reason
from ..retry import RetryPolicy
from .hub import StatusHub
from .schema import StatusMessage

__all__ = ["run_webhook"]

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT = 5.0


#: Four attempts, waits from 0.5 s: a webserver restarting loses no message.
_DEFAULT_RETRY = RetryPolicy(attempts=4, first_wait=0.5, max_wait=10.0)


class _ServerError(Exception):
    """An HTTP 5xx answer: the endpoint may recover, so the message is retried."""


async def _post(client: httpx.AsyncClient, url: str, message: StatusMessage) -> httpx.Response:
    response = await client.post(url, json=message, timeout=_REQUEST_TIMEOUT)
    if response.status_code >= 500:
        raise _ServerError(f"HTTP {response.status_code}")
    return response


async def _post_with_retries(
    client: httpx.AsyncClient, url: str, message: StatusMessage, retry: RetryPolicy
) -> bool:
    """POST ``message``; retry on network errors and 5xx. Return whether it was delivered."""
    try:
        response = await retry.call(
            lambda: _post(client, url, message),
            on=(httpx.HTTPError, _ServerError),
            what=f"webhook {url}: status seq={message['seq']}",
        )
    except (httpx.HTTPError, _ServerError) as error:
        log.warning(
            "webhook %s: gave up on status seq=%s after %d attempts (%s)",
            url,
            message["seq"],
            retry.attempts,
            short_reason(error),
        )
        return False
    if response.is_error:
        log.warning(
            "webhook %s refused status seq=%s: HTTP %d", url, message["seq"], response.status_code
        )
        return False
    return True


def _ignore() -> None:
    pass


async def run_webhook(
    hub: StatusHub,
    url: str,
    retry: RetryPolicy = _DEFAULT_RETRY,
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
                if not await _post_with_retries(client, url, message, retry):
                    failed()
