"""``fl-coordinator health`` against real gRPC servers: a grpcio one answering raw bytes
(any status, any failure), and the coordinator itself, over plaintext and TLS."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import trio
from helpers.pki import Pki, tls_settings
from helpers.processes import environment, run

from fl_coordinator.app import serve
from fl_coordinator.cli.main import main
from fl_coordinator.config import Settings
from fl_coordinator.storage.layout import Layout


@pytest.fixture
def health_server() -> Iterator[tuple[str, list[bytes], list[bytes]]]:
    """A grpcio server answering Check with the next queued bytes; records the requests."""
    answers: list[bytes] = []
    requests: list[bytes] = []

    def check(request: bytes, context: grpc.ServicerContext) -> bytes:
        requests.append(request)
        return answers.pop(0)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", answers, requests
    server.stop(grace=None)


def test_serving_is_exit_0_anything_else_1(
    health_server: tuple[str, list[bytes], list[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    address, answers, requests = health_server
    answers += [b"\x08\x01", b"\x08\x02", b""]
    assert main(["health", "--address", address]) == 0
    assert capsys.readouterr().out == f"{address}: SERVING\n"
    assert main(["health", "--address", address, "--service", "FlIntra"]) == 1
    assert capsys.readouterr().out == f"{address}: NOT_SERVING\n"
    assert main(["health", "--address", address]) == 1
    assert capsys.readouterr().out == f"{address}: UNKNOWN\n"
    assert requests == [b"", b"\x0a\x07FlIntra", b""]


def test_no_health_service_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # serves nothing
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert main(["health", "--address", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
    finally:
        server.stop(grace=None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"fl-coordinator health: 127.0.0.1:{port}: UNIMPLEMENTED (Method not found!)"]


async def ask(*args: str) -> int:
    """``fl-coordinator health ARGS`` (blocking grpcio) in a thread, as the container runs it."""
    return await trio.to_thread.run_sync(main, ["health", *args])


async def test_the_coordinator_is_serving_until_its_checkpoint_is_unreadable(
    settings: Settings, layout: Layout, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoints = await nursery.start(serve, settings)
    address = f"127.0.0.1:{endpoints.grpc_port}"
    assert await ask("--address", address) == 0
    assert await ask("--address", address, "--service", "flcoordinator.v1.FlIntraBatch") == 0
    good = layout.checkpoint.read_bytes()
    layout.checkpoint.write_bytes(b"not hdf5")
    assert await ask("--address", address) == 1
    layout.checkpoint.write_bytes(good)
    assert await ask("--address", address) == 0
    out = capsys.readouterr().out
    assert out == f"{address}: SERVING\n" * 2 + f"{address}: NOT_SERVING\n{address}: SERVING\n"


async def test_over_tls_with_the_coordinators_ca(
    settings: Settings, pki: Pki, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoints = await nursery.start(serve, tls_settings(settings, pki))
    address = f"127.0.0.1:{endpoints.grpc_port}"
    assert await ask("--address", address, "--ca", str(pki.ca)) == 0
    assert capsys.readouterr().out == f"{address}: SERVING\n"
    assert await ask("--address", address, "--timeout", "2") == 1  # plaintext: refused
    assert "UNAVAILABLE" in capsys.readouterr().err


async def test_under_mutual_tls_from_an_operator_host(
    settings: Settings, pki: Pki, nursery: trio.Nursery
) -> None:
    """The real command, with only --ca and a client certificate: no TLS_CLIENT_CA_FILE here."""
    mutual = tls_settings(settings, pki, tls_client_ca_file=str(pki.ca))
    endpoints = await nursery.start(serve, mutual)
    address = f"127.0.0.1:{endpoints.grpc_port}"
    env = environment(Path(settings.fl_root_path))
    probe = ["health", "--address", address, "--ca", str(pki.ca), "--timeout", "10"]
    client = ["--cert", str(pki.client.cert), "--key", str(pki.client.key)]
    done = await trio.to_thread.run_sync(run, [*probe, *client], env)
    assert (done.returncode, done.stdout) == (0, f"{address}: SERVING\n"), done.stderr
    # TLS_CERT_FILE alone (as the coordinator's pod has it) is presented too.
    with_cert = {**env, "TLS_CERT_FILE": str(pki.client.cert), "TLS_KEY_FILE": str(pki.client.key)}
    done = await trio.to_thread.run_sync(run, probe, with_cert)
    assert (done.returncode, done.stdout) == (0, f"{address}: SERVING\n"), done.stderr
    refused = await trio.to_thread.run_sync(run, probe, env)  # no certificate: refused
    assert refused.returncode == 1 and "SERVING" not in refused.stdout
    half = await trio.to_thread.run_sync(run, [*probe, "--cert", str(pki.client.cert)], env)
    assert (half.returncode, half.stderr) == (2, (
        "fl-coordinator health: configuration error: --key='': expected --cert and --key "
        "together\n"
    ))  # fmt: skip


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "soon", "1e10", "86401"])
def test_a_timeout_that_cannot_work_is_refused(
    health_server: tuple[str, list[bytes], list[bytes]],
    capsys: pytest.CaptureFixture[str],
    timeout: str,
) -> None:
    """--timeout -1 (or nan, or 1e10: gRPC's deadline overflowed into the past) was asked
    as it was: DEADLINE_EXCEEDED at once, exit 1, as if the coordinator were too slow to
    answer. Longer than a day is refused too."""
    address, _, requests = health_server
    with pytest.raises(SystemExit) as exited:
        main(["health", "--address", address, "--timeout", timeout])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "fl-coordinator health: error: argument --timeout: expected a number of seconds > 0 "
        f"and at most 86,400, not {timeout!r}"
    )
    assert requests == []


@pytest.mark.parametrize("flag", ["--ca", "--cert", "--key"])
@pytest.mark.parametrize("content", [b"root:x:0:0:root:/root:/bin/bash\n", b"\0" * (2 << 20)])
def test_a_file_that_is_not_pem_is_named(
    health_server: tuple[str, list[bytes], list[bytes]],
    capsys: pytest.CaptureFixture[str],
    pki: Pki,
    tmp_path: Path,
    flag: str,
    content: bytes,
) -> None:
    """--ca /etc/passwd was 'UNAVAILABLE (... Failed to create security handshaker.)' after
    four lines of grpc's C core on stderr, exit 1."""
    address, _, requests = health_server
    wrong = tmp_path / "wrong.pem"
    wrong.write_bytes(content)
    files = {"--ca": pki.ca, "--cert": pki.client.cert, "--key": pki.client.key, flag: wrong}
    args = [item for pair in files.items() for item in (pair[0], str(pair[1]))]
    assert main(["health", "--address", address, *args]) == 2
    assert capsys.readouterr().err == (
        f"fl-coordinator health: configuration error: {flag}={str(wrong)!r}: expected a PEM "
        "file (-----BEGIN ... lines, at most 1 MiB)\n"
    )
    assert requests == []
