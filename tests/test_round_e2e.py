"""Whole rounds over real loopback sockets: gRPC check-ins and reports, real
selector servers told to configure, real Keras files averaged, and a real
websocket subscriber watching every stage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest
import trio
from helpers.peers import (
    FakeSelector,
    GrpcioClient,
    IntraClient,
    PurerpcClient,
    assert_arrays_close,
    completed,
    fedavg,
    read_floats,
    watch,
    write_aggregate,
)

from fl_coordinator.app import serve
from fl_coordinator.config import Settings
from fl_coordinator.storage.layout import Layout


@pytest.fixture(params=["grpcio", "purerpc"])
def client_kind(request: pytest.FixtureRequest) -> str:
    return request.param


def make_client(kind: str, port: int) -> Iterator[IntraClient]:
    if kind == "grpcio":
        client = GrpcioClient(port)
        yield client
        client.close()
    else:
        yield PurerpcClient(port)


async def test_two_complete_rounds(
    settings: Settings, layout: Layout, keras_weights, client_kind: str, nursery: trio.Nursery
) -> None:
    settings = settings.replace(checkin_limit=3)
    endpoints = await nursery.start(serve, settings)
    first = await FakeSelector().start(nursery)
    second = await FakeSelector().start(nursery)
    watcher = await watch(nursery, endpoints.status_url)

    for client in make_client(client_kind, endpoints.grpc_port):
        for round_no, (a, b) in ((1, (0, 1)), (2, (2, 3))):
            before = read_floats(layout.checkpoint)
            accepted = [
                await client.check_in(first.id),
                await client.check_in(second.id),
                await client.check_in(first.id),
            ]
            assert accepted == [True, True, True]
            assert await client.check_in(second.id) is False  # goal of 3 reached
            await first.told.receive()
            await second.told.receive()

            write_aggregate(layout, first.id, keras_weights[a], weight=5)
            write_aggregate(layout, second.id, keras_weights[b], weight=7)
            await client.report(first.id)
            await client.report(second.id)
            done = await watcher.wait_for(completed(round_no))

            assert done["stage"] == "COMPLETED", done
            assert done["checkpoint"] == str(layout.checkpoint)
            assert done["aggregation_seconds"] >= 0
            assert done["selectors"] == [first.id, second.id]
            assert sorted(done["reported"]) == sorted([first.id, second.id])  # order of checks

            expected = fedavg(before, [(keras_weights[a], 5), (keras_weights[b], 7)])
            assert_arrays_close(read_floats(layout.checkpoint), expected)

    await watcher.wait_for(lambda m: m["round"] == 3)
    assert watcher.stages() == [
        (1, "SELECTION"), (1, "CONFIGURATION"), (1, "REPORTING"), (1, "COMPLETED"),
        (2, "SELECTION"), (2, "CONFIGURATION"), (2, "REPORTING"), (2, "COMPLETED"),
        (3, "SELECTION"),
    ]  # fmt: skip
    seqs = [m["seq"] for m in watcher.messages]
    assert seqs == sorted(set(seqs))
    assert {m["problem_id"] for m in watcher.messages} == {"DEFAULT"}
    assert all(m["time"].endswith("Z") and m["goal"] == 3 for m in watcher.messages)
    # Nothing of the coordinator's own may appear under initFiles/ (selectors send it all).
    assert sorted(p.name for p in layout.init_files.rglob("*")) == ["fl_checkpoint", "model.h5"]


def _rechunked(source: Path, dest: Path) -> Path:
    """``source``'s datasets in filtered (shuffle, fletcher32) column chunks, big-endian:
    a layout a selector may choose, copied by the coordinator before its pass."""
    with h5py.File(source, "r") as old, h5py.File(dest, "w") as new:

        def copy(name: str, item: object) -> None:
            if isinstance(item, h5py.Group):
                new.require_group(name).attrs.update(dict(item.attrs))
                return
            assert isinstance(item, h5py.Dataset)
            values = item[()]
            if values.ndim < 2 or values.dtype.kind != "f":
                new.create_dataset(name, data=values)
            else:
                new.create_dataset(name, data=values.astype(values.dtype.newbyteorder(">")),
                                   chunks=(values.shape[0], *(1,) * (values.ndim - 1)),
                                   shuffle=True, fletcher32=True)  # fmt: skip
            new[name].attrs.update(dict(item.attrs))

        new.attrs.update(dict(old.attrs))
        old.visititems(copy)
    return dest


async def test_a_round_with_an_aggregate_in_chunks_completes(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """One selector's aggregate in filtered big-endian column chunks, one plain: the round
    completes with PROTOCOL.md's average, and the coordinator's tmp folder is left empty."""
    settings = settings.replace(checkin_limit=2)
    endpoints = await nursery.start(serve, settings)
    first = await FakeSelector().start(nursery)
    second = await FakeSelector().start(nursery)
    watcher = await watch(nursery, endpoints.status_url)
    client = PurerpcClient(endpoints.grpc_port)
    before = read_floats(layout.checkpoint)
    assert [await client.check_in(first.id), await client.check_in(second.id)] == [True, True]
    await first.told.receive()
    await second.told.receive()
    chunked = _rechunked(keras_weights[0], tmp_path / "chunked.h5")
    write_aggregate(layout, first.id, chunked, weight=5)
    write_aggregate(layout, second.id, keras_weights[1], weight=7)
    await client.report(first.id)
    await client.report(second.id)
    done = await watcher.wait_for(completed(1))
    assert done["stage"] == "COMPLETED", done
    expected = fedavg(before, [(keras_weights[0], 5), (keras_weights[1], 7)])
    assert_arrays_close(read_floats(layout.checkpoint), expected)
    assert [p.name for p in layout.tmp.iterdir() if p.name.startswith(".input-copy.")] == []
