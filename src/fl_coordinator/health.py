"""``fl-coordinator health``: is the coordinator serving? For container health checks.

It calls the standard gRPC health service, ``/grpc.health.v1.Health/Check``,
on the coordinator's gRPC ``PORT``: the same RPC that Kubernetes' ``grpc``
probes and ``grpc_health_probe`` use, so the image, the cluster and an
operator's own tools all ask one question the same way.

The client is grpcio, not purerpc: an implementation independent of the
server's is a better probe. The two tiny messages are written and read by
hand (the request is one optional string, the answer one enum), so no
generated code is needed for them.
"""

from __future__ import annotations

from dataclasses import dataclass

METHOD = "/grpc.health.v1.Health/Check"

#: ``HealthCheckResponse.ServingStatus`` of grpc/health/v1/health.proto.
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
SERVING = 1


class HealthError(Exception):
    """The health service could not be asked; ``str()`` is one line."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def encode_request(service: str = "") -> bytes:
    """``HealthCheckRequest{service}``; the empty name asks about the server as a whole."""
    name = service.encode()
    return b"\x0a" + _varint(len(name)) + name if name else b""


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise HealthError("truncated health response")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def decode_status(data: bytes) -> int:
    """``HealthCheckResponse.status`` (field 1, an enum); 0 (UNKNOWN) when absent."""
    status, at = 0, 0
    while at < len(data):
        key, at = _read_varint(data, at)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, at = _read_varint(data, at)
            if field == 1:
                status = value
        elif wire_type == 2:
            length, at = _read_varint(data, at)
            at += length
        else:
            raise HealthError(f"unexpected wire type {wire_type} in health response")
    return status


@dataclass(frozen=True)
class Health:
    status: int

    @property
    def name(self) -> str:
        return STATUS_NAMES.get(self.status, str(self.status))

    @property
    def serving(self) -> bool:
        return self.status == SERVING


def check(address: str, service: str = "", timeout: float = 5.0) -> Health:
    """Ask ``address`` (``host:port``) for its health; raise HealthError if it cannot answer."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        # No serializers: grpcio sends and returns the bytes as they are.
        call = channel.unary_unary(METHOD)
        try:
            answer = call(encode_request(service), timeout=timeout)
        except grpc.RpcError as error:
            code = error.code().name if hasattr(error, "code") else "ERROR"
            details = error.details() if hasattr(error, "details") else str(error)
            raise HealthError(f"{address}: {code} ({details})") from None
    return Health(decode_status(answer))
