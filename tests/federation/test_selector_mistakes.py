"""Each mistake an operator can make starting ``fl-selector`` is one clear line (issue 13).

The real ``fl-selector serve`` runs as a subprocess against a real
``fl-coordinator serve`` (with a token) and real clients (purerpc). A setting
that cannot work stops it with one line and exit status 2; one that may still
come right (a coordinator not up yet, a folder not initialised yet) is a
warning with the address or path, and clients are told to come back.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from helpers.peers import refused_wait_ms
from helpers.processes import Served, environment

TOKEN = "f5a1c0de5e1ec7002"
SELECTOR = [sys.executable, "-m", "fl_coordinator.federation.selector_cli", "serve"]
SERVING = re.compile(r"selector (\S+) serving")


@dataclass
class Coordinator:
    served: Served
    root: Path
    grpc_port: int
    status_port: int


@pytest.fixture(scope="module")
def coordinator(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    """One ``fl-coordinator serve`` with a token, for the module."""
    root = tmp_path_factory.mktemp("coordinator") / "root"
    shutil.copytree(template / "problem", root)
    with Served(environment(root, AUTH_TOKEN=TOKEN)) as served:
        grpc_port, status_url = served.ready()
        status_port = int(status_url.rsplit(":", 1)[1].split("/")[0])
        yield Coordinator(served, root, grpc_port, status_port)


def selector(coordinator: str, root: Path, *flags: str, token: str | None = TOKEN) -> Served:
    env = environment(root)
    env.pop("AUTH_TOKEN", None)
    if token is not None:
        env["AUTH_TOKEN"] = token
    return Served(env, [*SELECTOR, "--coordinator", coordinator, "--root", str(root),
                        "--port", "0", *flags])  # fmt: skip


def one_line(served: Served) -> str:
    """The process ended with status 2 and said one line (no traceback)."""
    assert served.process.wait(timeout=60) == 2
    lines = served.rest().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def stopped(served: Served) -> str:
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=60) == 0
    log = served.rest()
    assert "Traceback" not in log
    return log


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_coordinators_status_port(coordinator: Coordinator) -> None:
    status = coordinator.status_port
    with selector(f"127.0.0.1:{status}", coordinator.root) as served:
        line = one_line(served)
    assert line == (
        f"fl-selector: the coordinator at 127.0.0.1:{status} answered in HTTP/1 (HTTP/1.1 405 ), "
        "not gRPC: is that its gRPC port? (selectors call the coordinator's gRPC PORT, 50050 "
        "by default)"
    )


def test_no_token_names_the_keys_and_the_coordinator_names_the_peer(
    coordinator: Coordinator,
) -> None:
    grpc_port = coordinator.grpc_port
    for token, problem in [(None, "no authorization metadata"), ("not-the-token", "wrong token")]:
        with selector(f"127.0.0.1:{grpc_port}", coordinator.root, token=token) as served:
            line = one_line(served)
        assert line == (
            f"fl-selector: the coordinator at 127.0.0.1:{grpc_port} refused the call: "
            f"UNAUTHENTICATED (unauthenticated: {problem}): give it the problem's token "
            "(AUTH_TOKEN, AUTH_TOKEN_FILE or --token-file)"
        )
        assert "Exceptions from Trio nursery" not in line
    refusal = coordinator.served.wait_for_line("refused a call to")
    assert re.search(
        r"refused a call to /flcoordinator\.v1\.FlIntraBatch/CheckInClients: no authorization "
        r"metadata \(from 127\.0\.0\.1:\d+\)$",
        refusal.strip(),
    ), refusal


async def test_nothing_listening_is_said_with_the_address(coordinator: Coordinator) -> None:
    port = closed_port()
    with selector(f"127.0.0.1:{port}", coordinator.root, "--waiting-time-ms", "700") as served:
        started = served.wait_for_line("serving")
        selector_id = SERVING.search(started).group(1)
        refused = (
            f"nothing listens at 127.0.0.1:{port} (connection refused): is the coordinator up?"
        )
        assert any(refused in line and "WARNING" in line for line in served.lines)
        with trio.fail_after(30):
            assert await refused_wait_ms(selector_id) == 700  # the client is told to come back
        line = await trio.to_thread.run_sync(served.wait_for_line, "could not ask")
        assert f"could not ask the coordinator about a client: {refused}" in line
        stopped(served)


async def test_a_root_without_init_files(coordinator: Coordinator, tmp_path: Path) -> None:
    grpc_port = coordinator.grpc_port
    with selector(f"127.0.0.1:{grpc_port}", tmp_path / "nowhere") as served:
        assert one_line(served) == (
            f"fl-selector: configuration error: --root='{tmp_path / 'nowhere'}': expected the "
            "problem's shared folder (it must exist)"
        )
    with selector(f"127.0.0.1:{grpc_port}", tmp_path, "--waiting-time-ms", "900") as served:
        selector_id = SERVING.search(served.wait_for_line("serving")).group(1)
        missing = (
            f"{tmp_path}/initFiles/model.h5 is missing (is {tmp_path} the coordinator's "
            "FL_ROOT_PATH, initialised with fl-coordinator init?)"
        )
        assert any(f"{missing}: clients are told to come back" in line for line in served.lines)
        with trio.fail_after(30):
            assert await refused_wait_ms(selector_id) == 900  # not accepted, not held
        line = await trio.to_thread.run_sync(served.wait_for_line, "a client is told")
        assert f"{missing}: a client is told to come back" in line
        stopped(served)


def test_advertise_with_a_port(coordinator: Coordinator) -> None:
    grpc_port = coordinator.grpc_port
    flags = ("--advertise", "10.200.0.11:50083")
    with selector(f"127.0.0.1:{grpc_port}", coordinator.root, *flags) as served:
        assert one_line(served) == (
            "fl-selector: configuration error: --advertise='10.200.0.11:50083': expected a host "
            "name or address without a port (--port's)"
        )


@pytest.mark.parametrize(
    ("address", "flags", "kind"),
    [
        ("coordinator.invalid:50050", (), "loopback"),  # a coordinator on another machine
        (None, ("--host", "0.0.0.0"), "wildcard"),  # never dialable, even from here
    ],
    ids=["127.0.0.1 seen from another host", "0.0.0.0"],
)
def test_an_id_the_coordinator_cannot_dial_is_warned(
    coordinator: Coordinator, address: str | None, flags: tuple[str, ...], kind: str
) -> None:
    address = address or f"127.0.0.1:{coordinator.grpc_port}"
    with selector(address, coordinator.root, *flags) as served:
        selector_id = SERVING.search(served.wait_for_line("serving")).group(1)
        host = selector_id.rpartition(":")[0]
        warning = next(line for line in served.lines if "dials the id" in line)
        assert "WARNING" in warning
        assert (
            f"selector id {selector_id}: {host} is a {kind} address; the coordinator at "
            f"{address} dials the id to say GoalCountReached and cannot reach this selector "
            "there: set --advertise to this machine's name or address as the coordinator sees it"
        ) in warning
        stopped(served)
