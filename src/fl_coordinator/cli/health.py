"""``fl-coordinator health``: is the coordinator serving? For container health checks.

It calls the standard gRPC health service, ``/grpc.health.v1.Health/Check``,
on the coordinator's gRPC ``PORT``: the same RPC that Kubernetes' ``grpc``
probes and ``grpc_health_probe`` use, so the image, the cluster and an
operator's own tools all ask one question the same way.

The client is grpcio, not purerpc: an implementation independent of the
server's is a better probe. It speaks TLS (and presents a client
certificate, for mutual TLS) when the coordinator does; the health service
needs no token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .._proto import health_pb2
from ..errors import ConfigError, HealthError

__all__ = ["Health", "Tls", "probe"]

_METHOD = "/grpc.health.v1.Health/Check"
_SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Tls:
    """How to dial a coordinator that serves TLS: its CA, and a client certificate for mTLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # the name in its certificate, if not the address's host

    def credentials(self) -> object:
        import grpc

        return grpc.ssl_channel_credentials(
            _pem("--ca", self.ca), _pem("--key", self.key), _pem("--cert", self.cert)
        )


#: Largest PEM file read: a CA bundle is a few hundred KiB.
_MAX_PEM_BYTES = 1 << 20


def _pem(flag: str, path: Path | None) -> bytes | None:
    """The PEM file ``path``, or ConfigError naming ``flag``.

    grpcio takes any bytes, and only says "Failed to create security handshaker"
    after its C core has logged its own lines on stderr: a wrong file (a key for
    the CA, /etc/passwd) is named here instead.
    """
    if path is None:
        return None
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_PEM_BYTES + 1)
    except OSError as error:
        raise HealthError(f"{path}: cannot read ({error.strerror})") from None
    if len(data) > _MAX_PEM_BYTES or b"-----BEGIN " not in data:
        raise ConfigError(flag, str(path), "a PEM file (-----BEGIN ... lines, at most 1 MiB)")
    return data


@dataclass(frozen=True)
class Health:
    status: int

    @property
    def name(self) -> str:
        try:
            return health_pb2.HealthCheckResponse.ServingStatus.Name(self.status)
        except ValueError:  # a status newer than our copy of health.proto
            return str(self.status)

    @property
    def serving(self) -> bool:
        return self.status == _SERVING


def probe(address: str, service: str = "", timeout: float = 5.0, tls: Tls | None = None) -> Health:
    """Ask ``address`` (``host:port``) for its health; raise HealthError if it cannot answer."""
    import grpc

    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
        channel = grpc.secure_channel(address, tls.credentials(), options=options)
    with channel:
        call = channel.unary_unary(
            _METHOD,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            answer = call(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            code = error.code().name if hasattr(error, "code") else "ERROR"
            details = error.details() if hasattr(error, "details") else str(error)
            raise HealthError(f"{address}: {code} ({details})") from None
    return Health(answer.status)
