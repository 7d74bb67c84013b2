"""The reference selector and client with the coordinator: real processes, real files."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import purerpc
import trio
from helpers.peers import (
    StatusWatcher,
    assert_arrays_close,
    completed,
    fedavg,
    read_floats,
    watch,
)

from fl_coordinator._proto import fl_round_grpc, fl_round_pb2
from fl_coordinator.app import serve
from fl_coordinator.config import Settings
from fl_coordinator.federation.client import _upload_messages
from fl_coordinator.federation.data import split_digits, write_shards
from fl_coordinator.federation.local import Endpoints, LocalFederation
from fl_coordinator.federation.selector import Selector, SelectorOptions
from fl_coordinator.federation.training import Hyper
from fl_coordinator.storage.layout import Layout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def uploads_of(layout: Layout, selector_id: str) -> list[tuple[Path, int]]:
    folder = layout.selector_dir(selector_id) / "roundFiles"
    return [
        (path, int((folder / path.name.replace("checkpoint_", "checkpoint_weight_")).read_text()))
        for path in sorted(folder.glob("checkpoint_[0-9]*"))
    ]


def summed(paths: list[Path]) -> dict[str, np.ndarray]:
    arrays = [read_floats(path) for path in paths]
    return {
        name: sum(a[name].astype(np.float64) for a in arrays).astype(arrays[0][name].dtype)
        for name in arrays[0]
    }


async def test_two_rounds_coordinator_two_selectors_three_client_processes(
    settings: Settings, layout: Layout, tmp_path: Path
) -> None:
    split = split_digits(clients=3, alpha=0.5, seed=1)
    shards = write_shards(split, tmp_path / "shards")
    federation = LocalFederation(layout.root, 2, shards, rounds=2, hyper=Hyper(epochs=1))
    digests = [sha256(layout.checkpoint)]
    after_round_1 = tmp_path / "after_round_1"
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            watcher = StatusWatcher()

            async def subscribe(endpoints: Endpoints) -> None:  # before round 1 can move on
                await nursery.start(watcher.run, endpoints.status_url)

            async with federation.running(subscribe) as endpoints:
                for number in (1, 2):
                    done = await watcher.wait_for(completed(number))
                    assert done["stage"] == "COMPLETED", done
                    digests.append(sha256(layout.checkpoint))
                    if number == 1:
                        shutil.copyfile(layout.checkpoint, after_round_1)
                await federation.wait_for_clients()
                federation.check_children()
            nursery.cancel_scope.cancel()

    assert len(set(digests)) == 3, "the global checkpoint must change in each round"
    stages = watcher.stages()
    assert stages[:8] == [
        (1, "SELECTION"), (1, "CONFIGURATION"), (1, "REPORTING"), (1, "COMPLETED"),
        (2, "SELECTION"), (2, "CONFIGURATION"), (2, "REPORTING"), (2, "COMPLETED"),
    ]  # fmt: skip
    assert [c.returncode for c in federation.children if c.name.startswith("client")] == [0] * 3

    # Each selector's aggregate is the sum of its clients' uploads (round 2's)...
    aggregates = []
    for selector_id in endpoints.selectors:
        uploads = uploads_of(layout, selector_id)
        assert len(uploads) == (2 if selector_id == endpoints.selectors[0] else 1)
        assert_arrays_close(
            read_floats(layout.agg_checkpoint(selector_id)), summed([p for p, _ in uploads])
        )
        weight = int(layout.agg_weight(selector_id).read_text())
        assert weight == sum(n for _, n in uploads)
        aggregates.append((layout.agg_checkpoint(selector_id), weight))
    # ...and the global model of round 2 is their FedAvg over round 1's.
    assert_arrays_close(
        read_floats(layout.checkpoint), fedavg(read_floats(after_round_1), aggregates)
    )


async def check_in(selector_id: str, downloads: dict[str, dict[str, bytes]], who: str) -> None:
    """A client that checks in and collects the files it is sent (then leaves)."""
    host, port = selector_id.rsplit(":", 1)
    files: dict[str, bytes] = {}
    async with purerpc.insecure_channel(host, int(port)) as channel:
        stream = await fl_round_grpc.FlRoundStub(channel).CheckIn()
        await stream.send_message(fl_round_pb2.CheckInRequest(message=who))
        await stream.close()
        while (message := await stream.receive_message()) is not None:
            assert message.type == fl_round_pb2.FL_FILES
            files[message.filePath] = files.get(message.filePath, b"") + message.chunk
    downloads[who] = files


async def test_client_that_vanishes_does_not_stall_its_selector(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery, caplog
) -> None:
    caplog.set_level(logging.INFO)
    endpoints = await nursery.start(serve, settings)
    watcher = await watch(nursery, endpoints.status_url)
    options = SelectorOptions(
        coordinator=f"127.0.0.1:{endpoints.grpc_port}", layout=layout, report_timeout=1.0
    )
    selector_id = await nursery.start(Selector(options).serve)

    downloads: dict[str, dict[str, bytes]] = {}
    async with trio.open_nursery() as clients:
        clients.start_soon(check_in, selector_id, downloads, "stays")
        clients.start_soon(check_in, selector_id, downloads, "vanishes")
    for files in downloads.values():  # both got every file of initFiles/
        assert files["fl_checkpoint"] == layout.checkpoint.read_bytes()
        assert files["model.h5"] == layout.model.read_bytes()

    # Only one of the two uploads; the other client is gone for good.
    host, port = selector_id.rsplit(":", 1)
    async with purerpc.insecure_channel(host, int(port)) as channel:
        answer = await fl_round_grpc.FlRoundStub(channel).Update(
            _upload_messages(keras_weights[0], 12)
        )
    assert answer.type == fl_round_pb2.FL_INT

    done = await watcher.wait_for(completed(1))
    assert done["stage"] == "COMPLETED" and done["reported"] == [selector_id]
    assert int(layout.agg_weight(selector_id).read_text()) == 12
    assert_arrays_close(
        read_floats(layout.agg_checkpoint(selector_id)), read_floats(keras_weights[0])
    )
    assert any("1 of 2 client(s) did not upload" in r.getMessage() for r in caplog.records)
