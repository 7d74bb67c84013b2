"""What one request message may weigh, per method, when its protocol makes it small.

``GRPC_MAX_MESSAGE_BYTES`` (4 MiB by default) bounds every message, but most
of the methods the coordinator serves take a handful of fields
(``protos/fl_intra.proto``, ``protos/fl_intra_batch.proto``,
``protos/health.proto``): a selector id (a ``host:port``, at most 255 bytes
as :func:`~..storage.layout.check_selector_id` checks it) and two or three
``uint32`` counts, or a service name: under 300 bytes. proto3 keeps the
fields it does not know, so a check-in padded with 4 MiB of an unknown field
parses fine and stays in memory as long as its call: a check-in is held
while the round aggregates, and 50 of them took 200 MiB (rt12).

:class:`~.connection.GrpcServer` checks a request's message against its
method's limit from the gRPC length prefix (and, compressed, as it inflates),
before the message is buffered whole or parsed, and refuses it with
``RESOURCE_EXHAUSTED`` (:func:`refusal`); the call's stream is reset and the
connection goes on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import purerpc

__all__ = ["SMALL_REQUEST_BYTES", "RequestLimits", "refusal", "small_requests"]

#: The limit of a request whose protocol makes it small: 60 times the largest such request
#: (a ``ClientRelease`` with a 255-byte id and two full counts: 270 bytes), so that a peer's
#: newer fields, or a longer id in a future version, still fit.
SMALL_REQUEST_BYTES = 16 * 1024

#: Largest request message, in bytes, by method path (``/<service>/<method>``).
RequestLimits = Mapping[str, int]


def small_requests(
    services: Iterable[purerpc.Service], limit: int = SMALL_REQUEST_BYTES
) -> dict[str, int]:
    """``limit`` for every method of ``services`` (methods whose requests are small)."""
    return {f"/{service.name}/{name}": limit for service in services for name in service.methods}


def refusal(path: str, limit: int) -> purerpc.Status:
    """The answer to a request larger than its method's ``limit`` (``path`` already shown
    safely: cut and escaped)."""
    return purerpc.Status(
        purerpc.StatusCode.RESOURCE_EXHAUSTED,
        f"request message larger than the limit of {limit} bytes for {path}, whose requests "
        "are a few hundred bytes by the protocol; send only the fields of its request message",
    )
