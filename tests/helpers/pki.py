"""Certificates for TLS tests, made by ``trustme`` (a throw-away CA) once per session.

The ``pki`` fixture is made available to every test module by conftest.py.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from fl_coordinator.config import Settings
from fl_coordinator.rpc.tls import client_context


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path

    @property
    def pems(self) -> tuple[bytes, bytes]:
        return self.key.read_bytes(), self.cert.read_bytes()


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Identity  # coordinator and selectors: 127.0.0.1 / localhost
    client: Identity  # a selector's client certificate from the same CA
    rogue: Identity  # a client certificate from another CA

    def credentials(self, identity: Identity | None = None) -> grpc.ChannelCredentials:
        key, chain = identity.pems if identity else (None, None)
        return grpc.ssl_channel_credentials(self.ca.read_bytes(), key, chain)

    def client_context(self, identity: Identity | None = None) -> ssl.SSLContext:
        if identity is None:
            return client_context(str(self.ca))
        return client_context(str(self.ca), str(identity.cert), str(identity.key))

    def websocket_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def _identity(ca: trustme.CA, folder: Path, name: str, *hosts: str) -> Identity:
    issued = ca.issue_cert(*hosts)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return Identity(cert, key)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return Pki(
        ca=folder / "ca.pem",
        server=_identity(ca, folder, "server", "127.0.0.1", "localhost"),
        client=_identity(ca, folder, "client", "selector.example"),
        rogue=_identity(other, folder, "rogue", "selector.example"),
    )


def tls_settings(settings: Settings, pki: Pki, **more: Any) -> Settings:
    return settings.replace(
        tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key), **more
    )
