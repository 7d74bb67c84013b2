"""Durability: the journal carries the round number across restarts; history allows rollback."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from helpers.peers import (
    FakeSelector,
    PurerpcClient,
    completed,
    run_round,
    serve_and_watch,
    watch,
    write_aggregate,
)
from helpers.processes import Served, environment

from fl_coordinator.app import serve
from fl_coordinator.config import Settings
from fl_coordinator.errors import ProblemError
from fl_coordinator.storage.atomic import write_atomic
from fl_coordinator.storage.journal import (
    Entry,
    history,
    history_usage,
    next_round,
    read_journal,
    remember,
    rollback,
    write_journal,
)
from fl_coordinator.storage.journal_writer import JournalWriter
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


def test_a_round_still_selecting_opens_again_with_its_number(layout: Layout) -> None:
    """Nothing of it was acted upon (no selector was told): no number is lost."""
    next_round(layout, keep=5)
    write_journal(layout, Entry(5, "SELECTION"))
    assert next_round(layout, keep=5) == 5
    write_journal(layout, Entry(5, "SELECTION", selectors=["a:1"]))  # clients were accepted
    assert next_round(layout, keep=5) == 5
    assert read_journal(layout).stage == "SELECTION"


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
    entry = read_journal(layout)  # the stop drained the journal: where the status stream was
    assert (entry.round, entry.stage, entry.aggregating) == (4, "SELECTION", False)

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


async def test_a_stopping_writer_still_writes_the_latest_entry(layout: Layout) -> None:
    """Cancelled before it ever ran (SIGTERM right after a stage change): nothing is lost."""
    writer = JournalWriter(layout)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        for entry in (Entry(5, "REPORTING", aggregating=True), Entry(5, "COMPLETED"),
                      Entry(6, "SELECTION")):  # fmt: skip
            writer.submit(entry)
        nursery.cancel_scope.cancel()
    assert read_journal(layout) == Entry(6, "SELECTION")


async def test_sigterm_leaves_the_journal_where_the_status_stream_is(
    layout: Layout, keras_weights, nursery: trio.Nursery
) -> None:
    served = Served(environment(layout.root, CHECKIN_LIMIT="2"))
    try:
        ready = re.search(
            r"selectors at \S+:(\d+) \(FlIntra\), status stream at (\S+),",
            await trio.to_thread.run_sync(served.wait_for_line, "FlIntra"),
        )
        assert ready is not None
        watcher = await watch(nursery, ready.group(2))
        sources = [(keras_weights[0], 2), (keras_weights[1], 3)]
        done = await run_round(nursery, int(ready.group(1)), watcher, layout, sources)
        assert done["stage"] == "COMPLETED"
        last = await watcher.wait_for(lambda m: m["round"] == 2)  # published with COMPLETED
        served.process.send_signal(signal.SIGTERM)  # at once: no time for a lazy writer
        assert await trio.to_thread.run_sync(served.process.wait) == 0
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()
    entry = read_journal(layout)
    assert (entry.round, entry.stage, entry.aggregating) == (2, "SELECTION", False)
    assert (last["round"], last["stage"], last["aggregating"]) == (2, "SELECTION", False)
    assert next_round(layout, keep=5) == 2  # reopened: nothing of it was acted upon


def test_kept_checkpoints_are_files_of_their_own_counted_against_the_disk(layout: Layout) -> None:
    next_round(layout, keep=5)
    for number in (1, 2, 3):
        write_atomic(layout.checkpoint, bytes(8192 * number), layout.tmp)  # a new file each round
        remember(layout, number, keep=5)
    kept = history(layout)
    assert list(kept) == [0, 1, 2, 3]
    own = [kept[n] for n in (0, 1, 2)]  # round 3's shares its blocks with the checkpoint
    assert history_usage(layout) == (3, sum(p.stat().st_blocks * 512 for p in own))
    rollback(layout, 1)
    own = [kept[n] for n in (0, 2, 3)]
    assert history_usage(layout) == (3, sum(p.stat().st_blocks * 512 for p in own))


def test_the_start_up_line_counts_kept_rounds_not_their_files(layout: Layout, caplog) -> None:
    # A round's metrics file beside its checkpoint was counted as a checkpoint: the demo's
    # folder said "9 kept checkpoint(s) ... (KEEP_CHECKPOINTS=5)" for 5 rounds.
    next_round(layout, keep=5)
    for number in (1, 2):
        write_atomic(layout.checkpoint, bytes(8192 * number), layout.tmp)
        remember(layout, number, keep=5)
        history(layout)[number].with_name(f"round-{number:06d}.metrics.json").write_text("{}")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fl_coordinator.storage.journal"):
        next_round(layout, keep=5)
    assert "3 kept round(s) in " in caplog.text and ": 4 file(s), " in caplog.text


async def test_a_history_that_cannot_be_written_does_not_undo_a_completed_round(
    settings: Settings, layout: Layout, keras_weights, nursery: trio.Nursery, caplog
) -> None:
    endpoints, watcher, _ = await serve_and_watch(nursery, settings)
    folder = layout.own / "history"
    shutil.rmtree(folder)
    folder.write_text("not a folder")  # every link into it fails
    sources = [(keras_weights[0], 2), (keras_weights[1], 3)]
    before = digest(layout.checkpoint)
    done = await run_round(nursery, endpoints.grpc_port, watcher, layout, sources)
    assert (done["stage"], done.get("error")) == ("COMPLETED", None)
    assert digest(layout.checkpoint) != before
    assert any(
        "round 1: completed, but its checkpoint could not be kept" in r.getMessage()
        for r in caplog.records
    )
    again = await run_round(nursery, endpoints.grpc_port, watcher, layout, sources, number=2)
    assert again["stage"] == "COMPLETED"


def test_a_start_after_a_rollback_says_which_round_it_starts_from(
    layout: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    next_round(layout, keep=5)  # keeps the initial checkpoint as round 0
    for number in (1, 2):
        write_atomic(layout.checkpoint, f"round {number}'s model".encode(), layout.tmp)
        remember(layout, number, keep=5)
    write_journal(layout, Entry(round=2, stage="COMPLETED"))
    with caplog.at_level(logging.INFO, logger="fl_coordinator.storage.journal"):
        assert next_round(layout, keep=5) == 3
    assert "restored" not in caplog.text  # the newest round's checkpoint: nothing to say
    rollback(layout, 1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fl_coordinator.storage.journal"):
        assert next_round(layout, keep=5) == 3
    assert [r.getMessage() for r in caplog.records if "restored" in r.getMessage()] == [
        "round 3 starts from the checkpoint of round 1, restored by rollback "
        "(the newest kept round is 2)"
    ]


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ('[{"round": 3, "stage": "SELECTION"}]', "expected one JSON object, found an array"),
        ('"SELECTION"', "expected one JSON object, found a string"),
        ('{"round": 3, "stage": "SELECTION", "rnd": 4}', "unknown key 'rnd' (1 unknown)"),
        ('{"stage": "SELECTION"}', "no round key"),
        ('{"round": "3", "stage": "SELECTION"}', "round must be a whole number and stage a string"),
        (
            '{"round": 3, "stage": "SELECTON"}',
            "stage 'SELECTON' is none of AGGREGATING, COMPLETED, CONFIGURATION, FAILED, "
            "FINISHED, REPORTING, SELECTION",
        ),
        (
            '{"round": 3, "stage": "REPORTING", "aggregating": "no"}',
            "aggregating must be true or false, found a string",
        ),
        (
            '{"round": 3, "stage": "REPORTING", "aggregating": 0}',
            "aggregating must be true or false, found a number",
        ),
        (
            '{"round": 3, "stage": "REPORTING", "selectors": ["a:1", 2]}',
            "selectors must be an array of selector ids (strings), found an array holding "
            "other values",
        ),
        (
            '{"round": 3, "stage": "REPORTING", "reported": {"a:1": true}}',
            "reported must be an array of selector ids (strings), found an object",
        ),
        ('{"round": 3, "stage": "REPORTING", "time": 17}', "time must be a string, found a number"),
        (
            '{"round": 3, "stage": "COMPLETED", "metrics": []}',
            "metrics must be an object or null, found an array",
        ),
        (
            '{"round": 3, "stage": "FINISHED", "finished": true}',
            "finished must be a string or null, found true or false",
        ),
    ],
    ids=[
        "array",
        "string",
        "unknown key",
        "no round",
        "round a string",
        "unknown stage",
        "aggregating a string",
        "aggregating a number",
        "selectors not strings",
        "reported an object",
        "time a number",
        "metrics an array",
        "finished a bool",
    ],
)
def test_a_journal_of_another_shape_says_what_is_wrong(
    layout: Layout, text: str, what: str
) -> None:
    """Not Python's "Entry() argument after ** must be a mapping": what the file should be."""
    (layout.own / "journal.json").parent.mkdir(parents=True, exist_ok=True)
    (layout.own / "journal.json").write_text(text)
    with pytest.raises(ProblemError) as refused:
        read_journal(layout)
    assert str(refused.value) == (
        f"{layout.own / 'journal.json'}: not a readable round journal ({what}); move it away "
        "to start counting rounds from the history"
    )


def test_a_journal_of_deeply_nested_brackets_is_refused_not_a_crash(layout: Layout) -> None:
    """json.loads raises RecursionError (not a ValueError) on deep nesting."""
    (layout.own / "journal.json").parent.mkdir(parents=True, exist_ok=True)
    (layout.own / "journal.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ProblemError, match="not a readable round journal"):
        read_journal(layout)
