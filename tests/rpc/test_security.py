"""Security, limits and health over real loopback sockets.

Certificates are made in the test by ``trustme`` (a throw-away CA); clients
are grpcio (``grpc.ssl_channel_credentials``), purerpc and trio-websocket.
The state of the round is read from the status stream: a refused call must
not change it (the next message's ``seq`` follows the one before the call).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import ssl
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import grpc
import purerpc
import pytest
import trio
import trio_websocket
from helpers.peers import (
    UPGRADE,
    FakeSelector,
    GrpcioClient,
    PurerpcClient,
    answer_to,
    bearer,
    completed,
    purerpc_failure,
    watch,
    write_aggregate,
)
from helpers.pki import Pki, tls_settings

from fl_coordinator._proto import (
    fl_intra_grpc,
    fl_intra_pb2,
    fl_round_grpc,
    fl_round_pb2,
    health_pb2,
)
from fl_coordinator.app import Endpoints, build_coordinator, serve
from fl_coordinator.cli import main as cli
from fl_coordinator.config import Settings, load_settings
from fl_coordinator.errors import ConfigError
from fl_coordinator.federation import selector_cli
from fl_coordinator.federation.selector import Selector, SelectorOptions
from fl_coordinator.federation.transfer import file_chunks, integer
from fl_coordinator.logs import NOISY, setup_logging
from fl_coordinator.rpc.auth import TokenGuard
from fl_coordinator.rpc.listener import serve_grpc
from fl_coordinator.rpc.tls import server_context
from fl_coordinator.status.hub import StatusHub
from fl_coordinator.storage.layout import Layout

TOKEN = "s3cret-Token-for-this-problem"
STATUS_TOKEN = "webserver-only-7f3a"


# -- helpers --------------------------------------------------------------------------


async def grpcio_code(client: GrpcioClient, selector_id: str) -> grpc.StatusCode:
    """The status code of a check-in that must fail."""
    with pytest.raises(grpc.RpcError) as failed:
        await client.check_in(selector_id)
    return failed.value.code()


def health_check(port: int, credentials: grpc.ChannelCredentials | None = None, service=""):
    target = f"127.0.0.1:{port}"
    with (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    ) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        response = check(health_pb2.HealthCheckRequest(service=service), timeout=30)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def health(port: int, **kwargs: Any) -> str:
    return await trio.to_thread.run_sync(functools.partial(health_check, port, **kwargs))


# -- TLS --------------------------------------------------------------------------------


async def test_tls_round_with_grpcio_and_the_selector_called_over_tls(
    settings: Settings, layout: Layout, keras_weights, pki: Pki, nursery: trio.Nursery
) -> None:
    settings = tls_settings(settings, pki, tls_selector_ca_file=str(pki.ca))
    endpoints: Endpoints = await nursery.start(serve, settings)
    assert endpoints.status_url.startswith("wss://")
    selector = await FakeSelector().start(
        nursery, server_context(str(pki.server.cert), str(pki.server.key))
    )
    watcher = await watch(nursery, endpoints.status_url, ssl_context=pki.websocket_context())
    client = GrpcioClient(endpoints.grpc_port, credentials=pki.credentials())
    assert [await client.check_in(selector.id) for _ in range(2)] == [True, True]
    await selector.told.receive()  # GoalCountReached arrived over TLS
    write_aggregate(layout, selector.id, keras_weights[0], weight=3)
    await client.report(selector.id)
    done = await watcher.wait_for(completed(1))
    assert (done["stage"], done["configured"]) == ("COMPLETED", [selector.id])
    client.close()


async def _check_in_at(selector_id: str, context: ssl.SSLContext, files: Path) -> None:
    """A client of the reference selector over TLS: check in, receive initFiles/."""
    host, port = selector_id.rsplit(":", 1)
    async with purerpc.secure_channel(host, int(port), context) as channel:
        stream = await fl_round_grpc.FlRoundStub(channel).CheckIn()
        await stream.send_message(fl_round_pb2.CheckInRequest(message="check in"))
        await stream.close()
        while (message := await stream.receive_message()) is not None:
            with (files / message.filePath).open("ab") as out:
                out.write(message.chunk)


async def _upload_to(selector_id: str, context: ssl.SSLContext, update: Path, n: int) -> None:
    async def messages():
        async with aclosing(file_chunks(update)) as chunks:
            async for chunk in chunks:
                yield chunk
        yield integer(n)

    host, port = selector_id.rsplit(":", 1)
    async with purerpc.secure_channel(host, int(port), context) as channel:
        await fl_round_grpc.FlRoundStub(channel).Update(messages())


async def test_reference_selector_completes_a_round_over_mutual_tls_with_a_token(
    settings: Settings, layout: Layout, keras_weights, pki: Pki, nursery: trio.Nursery, tmp_path
) -> None:
    """fl-selector's options: token, CA of the coordinator, its own certificate."""
    settings = tls_settings(
        settings,
        pki,
        checkin_limit=1,
        tls_client_ca_file=str(pki.ca),
        tls_selector_ca_file=str(pki.ca),
        auth_token=TOKEN,
    )
    endpoints = await nursery.start(serve, settings)
    watcher = await watch(nursery, endpoints.status_url, ssl_context=pki.websocket_context())
    options = SelectorOptions(
        coordinator=f"127.0.0.1:{endpoints.grpc_port}",
        layout=layout,
        token=TOKEN,
        coordinator_tls=pki.client_context(pki.client),
        server_tls=server_context(str(pki.server.cert), str(pki.server.key)),
        report_timeout=60,
    )
    selector_id = await nursery.start(Selector(options).serve)
    context = pki.client_context()
    (tmp_path / "files").mkdir()
    await _check_in_at(selector_id, context, tmp_path / "files")
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["fl_checkpoint", "model.h5"]
    await _upload_to(selector_id, context, keras_weights[0], n=4)
    done = await watcher.wait_for(completed(1))
    assert (done["stage"], done["reported"]) == ("COMPLETED", [selector_id])
    # A plaintext HTTP request at its TLS port is told what the port is, in plaintext (not
    # where the coordinator's status stream is: that text is the coordinator's own).
    answer = await answer_to(int(selector_id.rsplit(":", 1)[1]), UPGRADE)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b"\r\n\r\nthis port speaks gRPC over TLS\n")


async def test_plaintext_client_against_tls_server_fails(
    settings: Settings, pki: Pki, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    endpoints = await nursery.start(serve, tls_settings(settings, pki))
    selector = await FakeSelector().start(nursery)
    plain = GrpcioClient(endpoints.grpc_port)
    assert await grpcio_code(plain, selector.id) == grpc.StatusCode.UNAVAILABLE
    plain.close()
    # ws:// against wss://: no upgrade; HTTP 400 in plaintext says why, then the server
    # closes (before, it closed without a word, and trio-websocket 0.12's client, which does
    # not notice a connection closed during its handshake, waited its 60 s timeout).
    answer = await answer_to(endpoints.status_port, UPGRADE)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b"\r\n\r\nthis port speaks TLS: use wss:// for the status stream, "
                           b"https:// for its pages\n")  # fmt: skip
    # ws:// (or http://) at the TLS gRPC port, mistaken for the status port: the same, in
    # plaintext, naming the port to use (before: closed without a word, watch waited 10 s).
    answer = await answer_to(endpoints.grpc_port, UPGRADE)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b"\r\n\r\nthis port speaks gRPC over TLS, for selectors: the status "
                           b"stream (wss://) and its pages (https://) are on the coordinator's "
                           b"STATUS_PORT\n")  # fmt: skip
    # A peer that sends such a request and closes at once (a probe, a scanner): its reset
    # ends the answer quietly (before: "a connection's handler failed", ENOTCONN, a
    # traceback). The answered request after them was handled after theirs.
    for _ in range(3):
        probe = await trio.open_tcp_stream("127.0.0.1", endpoints.grpc_port)
        await probe.send_all(UPGRADE)
        await probe.aclose()
    assert (await answer_to(endpoints.grpc_port, UPGRADE)).startswith(b"HTTP/1.1 400 ")
    # The server goes on serving TLS clients.
    secure = GrpcioClient(endpoints.grpc_port, credentials=pki.credentials())
    assert await secure.check_in(selector.id) is True
    secure.close()
    assert "TLS handshake with 127.0.0.1:" in caplog.text
    assert "plaintext HTTP request on the TLS status port from 127.0.0.1:" in caplog.text
    assert "plaintext HTTP request on the TLS gRPC port from 127.0.0.1:" in caplog.text
    assert "handler failed" not in caplog.text
    assert "Traceback" not in caplog.text


async def test_mutual_tls_refuses_clients_without_a_valid_certificate(
    settings: Settings, pki: Pki, nursery: trio.Nursery
) -> None:
    settings = tls_settings(settings, pki, tls_client_ca_file=str(pki.ca))
    endpoints = await nursery.start(serve, settings)
    watcher = await watch(nursery, endpoints.status_url, ssl_context=pki.websocket_context())
    before = await watcher.wait_for(lambda m: True)
    selector = await FakeSelector().start(nursery)
    for identity in (None, pki.rogue):
        refused = GrpcioClient(endpoints.grpc_port, credentials=pki.credentials(identity))
        assert await grpcio_code(refused, selector.id) == grpc.StatusCode.UNAVAILABLE
        refused.close()
    trusted = GrpcioClient(endpoints.grpc_port, credentials=pki.credentials(pki.client))
    assert await trusted.check_in(selector.id) is True
    trusted.close()
    after = await watcher.wait_for(lambda m: m["accepted"] == 1)
    assert after["seq"] == before["seq"] + 1  # the refused ones published nothing


def test_tls_files_are_checked_at_start_up(settings: Settings, pki: Pki, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    cases = {
        "TLS_KEY_FILE": settings.replace(tls_cert_file=str(pki.server.cert), tls_key_file=""),
        "TLS_CERT_FILE": tls_settings(settings, pki).replace(tls_cert_file=str(bad)),
        "TLS_CLIENT_CA_FILE": tls_settings(settings, pki, tls_client_ca_file=str(bad)),
        "TLS_SELECTOR_CA_FILE": settings.replace(tls_selector_ca_file=str(tmp_path / "none")),
    }
    for key, broken in cases.items():
        with pytest.raises((ConfigError, BaseExceptionGroup)) as error:
            trio.run(serve, broken)
        found = error.value
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        assert isinstance(found, ConfigError) and found.key == key, (key, found)
    with pytest.raises(ConfigError, match="TLS_KEY_FILE=''"):
        load_settings({"TLS_CERT_FILE": "a.pem"}, {})


# -- tokens and the allow-list ----------------------------------------------------------


async def test_wrong_or_missing_token_is_unauthenticated_and_changes_nothing(
    settings: Settings, nursery: trio.Nursery
) -> None:
    endpoints = await nursery.start(serve, settings.replace(auth_token=TOKEN))
    watcher = await watch(nursery, endpoints.status_url)
    before = await watcher.wait_for(lambda m: True)
    selector = await FakeSelector().start(nursery)
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
        client = GrpcioClient(endpoints.grpc_port, token=token)
        assert await grpcio_code(client, selector.id) == grpc.StatusCode.UNAUTHENTICATED
        client.close()
    for token in (None, "wrong"):
        client = PurerpcClient(endpoints.grpc_port, token=token)
        failure = await purerpc_failure(lambda c=client: c.check_in(selector.id))
        assert failure.status.status_code == purerpc.StatusCode.UNAUTHENTICATED
        failure = await purerpc_failure(lambda c=client: c.report(selector.id))
        assert failure.status.status_code == purerpc.StatusCode.UNAUTHENTICATED
    assert await PurerpcClient(endpoints.grpc_port, token=TOKEN).check_in(selector.id) is True
    after = await watcher.wait_for(lambda m: m["accepted"] == 1)
    assert after["seq"] == before["seq"] + 1 and after["ignored"] == []
    assert await health(endpoints.grpc_port) == "SERVING"  # probes need no token


class _Echo(fl_round_grpc.FlRoundServicer):
    async def CheckIn(self, messages):
        async for _ in messages:
            yield integer(7)


async def test_the_token_guards_every_service_and_streaming_methods(
    nursery: trio.Nursery,
) -> None:
    """The guard wraps whatever services a server hosts, not one servicer's methods."""
    services = [_Echo().service, FakeSelector().service]
    serve_guarded = functools.partial(serve_grpc, guard=TokenGuard(TOKEN))
    port = await nursery.start(serve_guarded, services, "127.0.0.1", 0)

    async def check_in(token: str | None) -> tuple[list[int], purerpc.StatusCode]:
        async with purerpc.insecure_channel("127.0.0.1", port) as channel:
            stream = await fl_round_grpc.FlRoundStub(channel).CheckIn(metadata=bearer(token))
            await stream.send_message(fl_round_pb2.CheckInRequest(message="hi"))
            await stream.close()
            answers = []
            while (message := await stream.receive_message()) is not None:
                answers.append(message.intVal)
            return answers, stream.end_stream_event.status.status_code

    assert await check_in(TOKEN) == ([7], purerpc.StatusCode.OK)
    assert await check_in("nope") == ([], purerpc.StatusCode.UNAUTHENTICATED)

    async def goal_count_reached(token: str | None) -> None:
        async with purerpc.insecure_channel("127.0.0.1", port) as channel:
            await fl_intra_grpc.FLGoalCountBroadcastStub(channel).GoalCountReached(
                fl_intra_pb2.Empty(), metadata=bearer(token)
            )

    failure = await purerpc_failure(lambda: goal_count_reached(None))
    assert failure.status.status_code == purerpc.StatusCode.UNAUTHENTICATED
    await goal_count_reached(TOKEN)


async def test_token_from_a_file(settings: Settings, nursery: trio.Nursery, tmp_path) -> None:
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    endpoints = await nursery.start(serve, settings.replace(auth_token_file=str(secret)))
    selector = await FakeSelector().start(nursery)
    client = GrpcioClient(endpoints.grpc_port, token=TOKEN)
    assert await client.check_in(selector.id) is True
    client.close()
    with pytest.raises(ConfigError, match="AUTH_TOKEN_FILE"):
        load_settings({}, {"AUTH_TOKEN": TOKEN, "AUTH_TOKEN_FILE": str(secret)})


async def test_selector_outside_the_allow_list_is_refused(
    settings: Settings, nursery: trio.Nursery
) -> None:
    allowed, stranger = await FakeSelector().start(nursery), await FakeSelector().start(nursery)
    endpoints = await nursery.start(serve, settings.replace(allowed_selectors=(allowed.id,)))
    watcher = await watch(nursery, endpoints.status_url)
    client = PurerpcClient(endpoints.grpc_port)
    assert await client.check_in(stranger.id) is False
    shown = await watcher.wait_for(lambda m: m["ignored"])
    assert shown["ignored"] == [[stranger.id, "check-in refused: not in ALLOWED_SELECTORS"]]
    assert shown["accepted"] == 0
    await client.report(stranger.id)
    assert await client.check_in(allowed.id) is True
    assert (await watcher.wait_for(lambda m: m["accepted"] == 1))["selectors"] == [allowed.id]


# -- limits -------------------------------------------------------------------------------


async def test_too_large_grpc_message_is_refused_and_the_server_goes_on(
    settings: Settings, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    endpoints = await nursery.start(serve, settings.replace(grpc_max_message_bytes=256))
    watcher = await watch(nursery, endpoints.status_url)
    before = await watcher.wait_for(lambda m: True)
    client = GrpcioClient(endpoints.grpc_port)
    with pytest.raises(grpc.RpcError) as failed:
        await client.check_in("127.0.0.1:" + "1" * 300)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    # The reason travels in the HTTP/2 GOAWAY, which grpcio puts in the details.
    assert "message larger than the server's limit of 256 bytes" in failed.value.details()
    assert "larger than GRPC_MAX_MESSAGE_BYTES=256" in caplog.text
    selector = await FakeSelector().start(nursery)
    assert await client.check_in(selector.id) is True
    client.close()
    assert (await watcher.wait_for(lambda m: m["accepted"] == 1))["seq"] == before["seq"] + 1


async def test_distinct_selectors_per_round_are_capped(
    settings: Settings, nursery: trio.Nursery
) -> None:
    endpoints = await nursery.start(
        serve, settings.replace(max_selectors_per_round=1, checkin_limit=3)
    )
    watcher = await watch(nursery, endpoints.status_url)
    first, second = await FakeSelector().start(nursery), await FakeSelector().start(nursery)
    client = PurerpcClient(endpoints.grpc_port)
    assert await client.check_in(first.id) is True
    assert await client.check_in(second.id) is False
    assert await client.check_in(first.id) is True
    shown = await watcher.wait_for(lambda m: m["accepted"] == 2)
    assert shown["selectors"] == [first.id]
    reason = "check-in refused: the round already has 1 selector(s) (MAX_SELECTORS_PER_ROUND)"
    assert shown["ignored"] == [[second.id, reason]]


# -- the status websocket ------------------------------------------------------------------


async def test_websocket_requires_the_status_token(
    settings: Settings, nursery: trio.Nursery
) -> None:
    endpoints = await nursery.start(serve, settings.replace(status_token=STATUS_TOKEN))
    for token in (None, "wrong"):
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            await watch(nursery, endpoints.status_url, token=token)
        assert rejected.value.status_code == 401
        assert STATUS_TOKEN.encode() not in (rejected.value.body or b"")
    watcher = await watch(nursery, endpoints.status_url, token=STATUS_TOKEN)
    assert (await watcher.wait_for(lambda m: True))["stage"] == "SELECTION"


async def test_websocket_subscribers_are_capped_and_must_not_talk(
    settings: Settings, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings.replace(max_status_subscribers=1, status_max_message_bytes=64)
    endpoints = await nursery.start(serve, settings)
    async with trio_websocket.open_websocket_url(endpoints.status_url) as chatty:
        await chatty.get_message()
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            await watch(nursery, endpoints.status_url)
        assert rejected.value.status_code == 503
        await chatty.send_message("x" * 1000)
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                await chatty.get_message()
        assert closed.value.reason.code == 1009
    assert "larger than STATUS_MAX_MESSAGE_BYTES" in caplog.text
    assert "MAX_STATUS_SUBSCRIBERS=1" in caplog.text
    # Its place is free again.
    watcher = await watch(nursery, endpoints.status_url)
    assert (await watcher.wait_for(lambda m: True))["stage"] == "SELECTION"


# -- health -----------------------------------------------------------------------------------


async def test_health_check_follows_the_checkpoint(
    settings: Settings, layout: Layout, pki: Pki, nursery: trio.Nursery
) -> None:
    settings = tls_settings(settings, pki, auth_token=TOKEN)
    endpoints = await nursery.start(serve, settings)
    credentials = pki.credentials()
    assert await health(endpoints.grpc_port, credentials=credentials) == "SERVING"
    assert await health(endpoints.grpc_port, credentials=credentials, service="FlIntra") == (
        "SERVING"
    )
    moved = layout.checkpoint.with_name("moved")
    layout.checkpoint.rename(moved)
    assert await health(endpoints.grpc_port, credentials=credentials) == "NOT_SERVING"
    layout.checkpoint.write_bytes(b"not HDF5 at all")
    assert await health(endpoints.grpc_port, credentials=credentials) == "NOT_SERVING"
    moved.replace(layout.checkpoint)
    assert await health(endpoints.grpc_port, credentials=credentials) == "SERVING"
    with pytest.raises(grpc.RpcError) as unknown:
        await health(endpoints.grpc_port, credentials=credentials, service="Nope")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_knows_whether_the_round_task_runs(settings: Settings, layout: Layout) -> None:
    """The other half of SERVING: Coordinator.alive (the server's probe ANDs both)."""
    coordinator = build_coordinator(settings, layout, StatusHub("p", "c"))
    assert coordinator.alive is False
    async with trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        assert coordinator.alive is True
        nursery.cancel_scope.cancel()
    assert coordinator.alive is False


# -- secrets stay secret ------------------------------------------------------------------------


@pytest.fixture
def program_logging() -> Iterator[None]:
    """The program's own logging policy (logs.py), undone after the test."""
    levels = {name: logging.getLogger(name).level for name in NOISY}
    setup_logging("DEBUG")
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


async def test_tokens_appear_in_no_log_line_and_no_status_message(
    settings: Settings,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    program_logging: None,
) -> None:
    """At LOG_LEVEL=DEBUG, with calls that carry the right and the wrong tokens.

    (hpack logs raw headers at DEBUG: logs.py keeps it at WARNING.)
    """
    caplog.set_level(logging.DEBUG)
    settings = settings.replace(auth_token=TOKEN, status_token=STATUS_TOKEN)
    endpoints = await nursery.start(serve, settings)
    watcher = await watch(nursery, endpoints.status_url, token=STATUS_TOKEN)
    selector = await FakeSelector().start(nursery)
    with pytest.raises(trio_websocket.ConnectionRejected):
        await watch(nursery, endpoints.status_url, token=TOKEN)  # the wrong one
    wrong = GrpcioClient(endpoints.grpc_port, token=STATUS_TOKEN)
    assert await grpcio_code(wrong, selector.id) == grpc.StatusCode.UNAUTHENTICATED
    wrong.close()
    client = GrpcioClient(endpoints.grpc_port, token=TOKEN)
    assert await client.check_in(selector.id) is True
    assert await client.check_in(selector.id) is True
    client.close()
    await selector.told.receive()
    await watcher.wait_for(lambda m: m["configured"] == [selector.id])
    assert "refused a call to /FlIntra/ClientCountUpdate: wrong token" in caplog.text
    assert "refused status subscriber" in caplog.text
    everything = caplog.text + json.dumps(watcher.messages) + repr(settings)
    for secret in (TOKEN, STATUS_TOKEN):
        assert secret not in everything


def test_a_bad_token_is_not_echoed_at_start_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUTH_TOKEN", "almost secret value")  # a space: not a valid token
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "AUTH_TOKEN=<redacted>" in err and "almost secret" not in err


async def test_plaintext_on_a_network_address_is_warned_about(
    settings: Settings, pki: Pki, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    def own_root(name: str, settings: Settings) -> Settings:  # one coordinator per folder
        root = settings.root.with_name(name)
        shutil.copytree(settings.root, root)
        return settings.replace(fl_root_path=str(root))

    # Copied before any coordinator runs: a live folder has journal files coming and going.
    exposed = own_root("any", settings.replace(host="0.0.0.0"))
    exposed_tls = own_root("tls", tls_settings(settings, pki, host="0.0.0.0"))
    await nursery.start(serve, settings)  # 127.0.0.1: local use, no warning
    assert "without TLS" not in caplog.text
    await nursery.start(serve, exposed)
    assert "the gRPC server listens on 0.0.0.0 without TLS" in caplog.text
    assert "the status stream listens on 0.0.0.0 without TLS" in caplog.text
    caplog.clear()
    await nursery.start(serve, exposed_tls)

    assert "without TLS" not in caplog.text


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--tls-cert", "x.pem"], "--tls-key=''"),
        (["--coordinator-ca", "/nonexistent/ca.pem"], "--coordinator-ca='/nonexistent/ca.pem'"),
        (["--token-file", "/nonexistent/token"], "AUTH_TOKEN_FILE='/nonexistent/token'"),
    ],
)
def test_selector_security_flags_are_checked_before_serving(
    flags: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert selector_cli.main(["serve", *flags]) == 2
    assert expected in capsys.readouterr().err
