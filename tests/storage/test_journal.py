"""Durability: the journal carries the round number across restarts; history allows rollback."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import trio
from helpers.peers import FakeSelector, PurerpcClient, completed, watch, write_aggregate

from fl_coordinator.app import serve
from fl_coordinator.config import Settings
from fl_coordinator.storage.atomic import write_atomic
from fl_coordinator.storage.journal import (
    Entry,
    history,
    next_round,
    read_journal,
    rollback,
    write_journal,
)
from fl_coordinator.storage.layout import Layout


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fresh_folder_starts_at_round_one_and_keeps_the_initial_checkpoint(layout: Layout) -> None:
    assert next_round(layout, keep=5) == 1
    assert list(history(layout)) == [0]
    assert digest(history(layout)[0]) == digest(layout.checkpoint)


def test_interrupted_round_is_abandoned_and_numbering_continues(layout: Layout) -> None:
    next_round(layout, keep=5)
    before = digest(layout.checkpoint)
    write_journal(layout, Entry(7, "REPORTING", selectors=["a:1"], reported=["a:1"]))
    assert next_round(layout, keep=5) == 8
    assert read_journal(layout).stage == "FAILED"
    assert digest(layout.checkpoint) == before


def test_a_round_still_selecting_nobody_opens_again_with_its_number(layout: Layout) -> None:
    next_round(layout, keep=5)
    write_journal(layout, Entry(5, "SELECTION"))
    assert next_round(layout, keep=5) == 5  # nothing happened in it: no number lost
    write_journal(layout, Entry(5, "SELECTION", selectors=["a:1"]))  # clients were accepted
    assert next_round(layout, keep=5) == 6
    assert read_journal(layout).stage == "FAILED"


def test_aggregation_that_finished_before_the_crash_counts_as_completed(layout: Layout) -> None:
    next_round(layout, keep=5)
    write_journal(layout, Entry(3, "REPORTING", aggregating=True))
    write_atomic(layout.checkpoint, b"the new checkpoint", layout.tmp)  # renamed, not journaled
    assert next_round(layout, keep=5) == 4
    assert read_journal(layout).stage == "COMPLETED"
    assert history(layout)[3].read_bytes() == b"the new checkpoint"


def test_aggregation_that_did_not_finish_is_abandoned(layout: Layout) -> None:
    next_round(layout, keep=5)
    before = digest(layout.checkpoint)
    write_journal(layout, Entry(3, "REPORTING", aggregating=True))
    assert next_round(layout, keep=5) == 4
    assert read_journal(layout).stage == "FAILED"
    assert digest(layout.checkpoint) == before and 3 not in history(layout)


async def one_round(settings: Settings, layout: Layout, weights: Path, nursery: trio.Nursery,
                    number: int) -> dict:  # fmt: skip
    endpoints = await nursery.start(serve, settings)
    selector = await FakeSelector().start(nursery)
    watcher = await watch(nursery, endpoints.status_url)
    client = PurerpcClient(endpoints.grpc_port)
    first = await watcher.wait_for(lambda m: True)
    assert first["round"] == number  # the numbering survived the restart
    assert [await client.check_in(selector.id) for _ in range(2)] == [True, True]
    await selector.told.receive()
    write_aggregate(layout, selector.id, weights, weight=4)
    await client.report(selector.id)
    return await watcher.wait_for(completed(number))


async def test_restart_continues_numbering_and_rollback_restores(
    settings: Settings, layout: Layout, keras_weights
) -> None:
    checkpoints = [digest(layout.checkpoint)]
    for number in (1, 2, 3):
        async with trio.open_nursery() as nursery:  # a new coordinator each round
            done = await one_round(settings, layout, keras_weights[number], nursery, number)
            assert done["stage"] == "COMPLETED"
            nursery.cancel_scope.cancel()
        checkpoints.append(digest(layout.checkpoint))
    assert len(set(checkpoints)) == 4
    entry = read_journal(layout)  # a graceful stop writes what is queued: never behind
    assert (entry.round, entry.stage) == (4, "SELECTION")

    assert {n: digest(p) for n, p in history(layout).items()} == dict(enumerate(checkpoints))

    rollback(layout, 1)
    assert digest(layout.checkpoint) == checkpoints[1]
    async with trio.open_nursery() as nursery:  # numbering goes on after a rollback
        done = await one_round(settings, layout, keras_weights[0], nursery, 4)
        assert done["stage"] == "COMPLETED"
        nursery.cancel_scope.cancel()


def test_rollback_command(settings: Settings, layout: Layout) -> None:
    next_round(layout, keep=5)
    write_atomic(layout.checkpoint, b"round one's model", layout.tmp)
    next_round(layout, keep=5)  # nothing journaled: only the initial one is kept
    env = {"FL_ROOT_PATH": str(layout.root), "PATH": ""}
    command = [sys.executable, "-m", "fl_coordinator", "rollback"]
    listing = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert "0: " in listing.stdout
    missing = subprocess.run([*command, "--round", "9"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2
    assert "--round=9: expected a kept round (available: 0)" in missing.stderr
    restored = subprocess.run([*command, "--round", "0"], env=env, capture_output=True, text=True)
    assert restored.returncode == 0, restored.stderr
    assert layout.checkpoint.read_bytes() == history(layout)[0].read_bytes()
    assert layout.checkpoint.read_bytes() != b"round one's model"
