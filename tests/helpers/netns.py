"""Hosts of their own on this machine: Linux network namespaces joined by a switch.

Each :class:`Host` is a network namespace with one link (a veth pair) to a
switch, a bridge in a namespace of its own, an address in 192.0.2.0/24
(TEST-NET-1, for documentation: routed nowhere) and no route out, so what
runs there reaches the other hosts and nothing else. Nothing is added to the
machine's own namespace, and the names carry the test process's id, so runs
side by side do not meet. :meth:`Network.cut` pulls a host's cable: its port
on the switch goes down. :meth:`Network.resolve` gives a host names for the
others (its own ``/etc/hosts``, which ``ip netns exec`` mounts over the machine's
for what runs there). Needs root and iproute2 (``ip``).

A run killed before its cleanup (SIGTERM from ``timeout`` or a cancelled CI
job, SIGKILL) leaves its namespaces, their ``/etc/netns`` files and what runs
on its hosts (a ``serve`` never ends by itself); the next run deletes them all
(:func:`_remove_stale`): what still runs on a host is killed with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Host", "Network", "NetworkUnavailable", "network", "network_names"]

_PREFIX = "flnet"
#: Where ``ip netns exec NAME`` finds files to mount over /etc's for that namespace.
_ETC = Path("/etc/netns")
_SUBNET_BITS = 24


class NetworkUnavailable(RuntimeError):
    """Namespaces cannot be made here; the message says why and what is needed."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetworkUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    name: str  # its namespace
    address: str
    port: str  # its link's end on the switch

    @property
    def prefix(self) -> list[str]:
        """Run a command on this host: ``[*host.prefix, program, ...]``."""
        return ["ip", "netns", "exec", self.name]


class Network:
    """A switch and the hosts on it; :meth:`remove` deletes them all."""

    def __init__(self) -> None:
        if shutil.which("ip") is None:
            raise NetworkUnavailable("iproute2 is not installed (apt-get install iproute2)")
        if os.geteuid() != 0:
            raise NetworkUnavailable(f"making network namespaces needs root; uid is {os.geteuid()}")
        _remove_stale()
        self._tag = f"{_PREFIX}-{os.getpid()}"
        self.switch = f"{self._tag}-switch"
        self.hosts: list[Host] = []
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add(self, name: str, address: str) -> Host:
        host = Host(f"{self._tag}-{name}", address, f"p{len(self.hosts)}")
        self.hosts.append(host)
        _ip("netns", "add", host.name)
        _ip("-n", host.name, "link", "add", "eth0", "type", "veth",
            "peer", "name", host.port, "netns", self.switch)  # fmt: skip
        _ip("-n", host.name, "addr", "add", f"{address}/{_SUBNET_BITS}", "dev", "eth0")
        for link in ("lo", "eth0"):
            _ip("-n", host.name, "link", "set", link, "up")
        _ip("-n", self.switch, "link", "set", host.port, "master", "br0")
        _ip("-n", self.switch, "link", "set", host.port, "up")
        return host

    def cut(self, host: Host) -> None:
        """Unplug ``host``: its port on the switch goes down (the host sees NO-CARRIER)."""
        _ip("-n", self.switch, "link", "set", host.port, "down")

    def resolve(self, host: Host, names: dict[str, str]) -> None:
        """On ``host``, each of ``names`` (host name -> address) resolves to its address,
        as a DNS server would say (``localhost`` too)."""
        lines = ["127.0.0.1 localhost", *(f"{address} {name}" for name, address in names.items())]
        folder = _ETC / host.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def remove(self) -> None:
        for name in [h.name for h in self.hosts] + [self.switch]:
            _delete(name)


def _delete(name: str) -> None:
    """Kill what still runs on host ``name`` (nothing may outlive its test), then delete it."""
    running = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30
    )
    for pid in running.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    shutil.rmtree(_ETC / name, ignore_errors=True)


def _stale(name: str) -> bool:
    """Whether ``name`` is a host of a run whose process is gone."""
    parts = name.split("-")
    ours = len(parts) >= 3 and parts[0] == _PREFIX and parts[1].isdigit()
    return ours and not os.path.exists(f"/proc/{parts[1]}")


def network_names() -> set[str]:
    """The names of this machine's network namespaces (``ip netns list``)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def _remove_stale() -> None:
    """Delete the hosts (namespaces, /etc/netns files, what runs there) of killed runs."""
    names = network_names()
    if _ETC.is_dir():
        names |= {path.name for path in _ETC.iterdir()}
    for name in sorted(names):
        if _stale(name):
            _delete(name)


@pytest.fixture
def network() -> Iterator[Network]:
    """A switch for the test's hosts, removed after it; a test that cannot have one fails
    and says why (never skipped: CI runs as root, and .ci/run installs iproute2)."""
    try:
        made = Network()
    except NetworkUnavailable as error:
        pytest.fail(
            f"cannot make the test's hosts (network namespaces): {error}. This test needs "
            "root and iproute2; CI runs as root, and .ci/run installs iproute2 if missing."
        )
    try:
        yield made
    finally:
        made.remove()
