"""The round log: records kept across restarts, later changes, a bound, a cut last line."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from typing import Any

import trio

from fl_coordinator.storage.journal import remember
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.round_log import (
    MAX_HISTORY_BYTES,
    MAX_LINE_BYTES,
    RoundLog,
    round_log_path,
)


def ended(number: int, stage: str = "COMPLETED", **extra: Any) -> dict[str, Any]:
    """A status message that ends round ``number`` (the fields a record is made of)."""
    return {
        "round": number,
        "stage": stage,
        "stage_started": "2026-11-28T00:00:02.000Z",
        "stages": {"SELECTION": "2026-11-28T00:00:00.000Z", stage: "2026-11-28T00:00:02.000Z"},
        "accepted": 1,
        "goal": 1,
        "selectors": ["a:1"],
        "reported": ["a:1"],
        "configured": ["a:1"],
        "unreachable": [],
        "rejected": {},
        **extra,
    }


async def written(log: RoundLog, *messages: dict[str, Any]) -> None:
    """Hand ``messages`` to ``log`` and stop it (which writes what it holds)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run)
        for message in messages:
            log.observe(message)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


async def test_records_survive_a_restart_with_their_later_metrics(layout: Layout) -> None:
    remember(layout, 1, keep=5)  # the checkpoint round 1 produced, as the aggregation keeps it
    digest = hashlib.sha256(layout.checkpoint.read_bytes()).hexdigest()
    await written(
        RoundLog(layout, keep=10),
        ended(1, aggregation_seconds=0.5),
        ended(2, "FAILED", error="too few"),
    )
    assert len(round_log_path(layout).read_text().splitlines()) == 2
    # Evaluated while round 3 runs, at a restarted coordinator: round 1's record gets them.
    evaluated = {**ended(3, "SELECTION"), "metrics": {"round": 1, "values": {"loss": 0.25}}}
    await written(RoundLog(layout, keep=10), evaluated, evaluated)
    assert len(round_log_path(layout).read_text().splitlines()) == 3  # one line more, once
    again = RoundLog(layout, keep=10)
    second, first = again.newest()
    assert (first["round"], first["outcome"], first["metrics"]) == (1, "COMPLETED", {"loss": 0.25})
    assert first["checkpoint_sha256"] == digest and first["aggregation_seconds"] == 0.5
    assert (second["round"], second["error"], second["checkpoint_sha256"]) == (2, "too few", None)
    assert again.newest(before=2) == [first] and again.newest(limit=1) == [second]


async def test_the_end_of_the_run_joins_the_round_it_follows(layout: Layout) -> None:
    why = "round 2 was the last (ROUNDS=2); to go on, raise ROUNDS and restart"
    await written(RoundLog(layout, keep=10), ended(2))
    await written(
        RoundLog(layout, keep=10),
        ended(2, "FINISHED", finished=why),
        ended(2, "FINISHED", finished=why),  # repeated while finished: no new line
        ended(3, "FINISHED", finished="STOP_WHEN met"),  # a round open when the run finished
    )
    assert len(round_log_path(layout).read_text().splitlines()) == 3
    third, second = RoundLog(layout, keep=10).newest()
    assert (second["outcome"], second["finished"]) == ("COMPLETED", why)
    assert (third["outcome"], third["finished"]) == ("FINISHED", "STOP_WHEN met")


async def test_the_file_is_bounded_and_a_cut_line_is_skipped(layout: Layout, caplog) -> None:
    await written(RoundLog(layout, keep=3), *[ended(n, "FAILED") for n in range(1, 8)])
    lines = round_log_path(layout).read_text().splitlines()
    assert len(lines) < 2 * 3  # rewritten with the newest when it reached twice the bound
    assert [json.loads(line)["round"] for line in lines][-1] == 7
    with round_log_path(layout).open("a") as file:
        file.write('{"round": 8, "outc')  # a crash in the middle of a line
    log = RoundLog(layout, keep=3)
    assert [record["round"] for record in log.newest()] == [7, 6, 5]
    assert "1 line(s) are not round records (or longer than 16 MiB); skipped" in caplog.text


async def test_rounds_of_many_selectors_are_kept_fewer_within_the_byte_bound(
    layout: Layout,
) -> None:
    selectors = [f"selector-{index:06d}.example:50051" for index in range(20_000)]
    big = [
        ended(n, "FAILED", selectors=selectors, configured=selectors, reported=selectors)
        for n in range(1, 31)
    ]  # 30 rounds of 20,000 selectors: about 1.3 MB each as a line
    log = RoundLog(layout, keep=2000)
    await written(log, *big)
    held = [record["round"] for record in log.newest(limit=1000)]
    weight = len(json.dumps(log.newest(limit=1)[0])) + 1
    assert held == list(range(30, 30 - len(held), -1))  # the newest, none missing between
    assert len(held) == MAX_HISTORY_BYTES // weight  # as many as fit, and no more
    assert 5 < len(held) < 30
    again = RoundLog(layout, keep=2000)  # the file holds no more than memory did
    assert [record["round"] for record in again.newest(limit=1000)] == held
    assert round_log_path(layout).stat().st_size <= 2 * MAX_HISTORY_BYTES


def _line(number: int, **fields: Any) -> bytes:
    """A record's line, as the round log writes it."""
    record = {
        "round": number,
        "outcome": "COMPLETED",
        "stages": {},
        "ended": "2026-11-28T00:00:02.000Z",
        "accepted": 1,
        "goal": 1,
        "selectors": [],
        "aggregation_seconds": 0.5,
        "checkpoint_sha256": None,
        **fields,
    }
    return json.dumps(record).encode() + b"\n"


def test_lines_that_are_not_records_are_skipped_whatever_they_hold(layout: Layout, caplog) -> None:
    # Each of these once either ended the start-up (nested brackets: RecursionError), was
    # served as JSON no browser parses (NaN), broke the dashboard (no selectors), or was held
    # and served whole on every request (a 5 MiB line).
    lines = [
        _line(1),
        b"[" * 100_000 + b"\n",
        _line(2, aggregation_seconds=float("nan")),
        _line(3),
        _line(True),
        json.dumps({"round": 4, "outcome": "COMPLETED"}).encode() + b"\n",
        _line(5, outcome="FAILED", error="x" * (MAX_LINE_BYTES + 1)),
        _line(6),
        b'{"round": 7, "outc',
    ]
    round_log_path(layout).parent.mkdir(parents=True, exist_ok=True)
    round_log_path(layout).write_bytes(b"".join(lines))
    records = RoundLog(layout, keep=10).newest()
    assert [record["round"] for record in records] == [6, 3, 1]
    json.dumps(records, allow_nan=False)  # strict JSON, as GET /rounds serves it
    assert "6 line(s) are not round records (or longer than 16 MiB); skipped" in caplog.text


async def test_a_huge_file_costs_bounded_memory_and_is_compacted(layout: Layout) -> None:
    path = round_log_path(layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        for _ in range(32):  # 45 MB of junk: lines that are not records, 1 MiB long ones
            file.write(b"not a record\n" * (1 << 15) + b"x" * (1 << 20) + b"\n")
        file.write(_line(1) + _line(2) + _line(3))
    tracemalloc.start()
    try:
        log = RoundLog(layout, keep=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [record["round"] for record in log.newest()] == [3, 2, 1]
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB held to read a 45 MB file"
    await written(log, ended(4))
    assert [json.loads(line)["round"] for line in path.read_bytes().splitlines()] == [2, 3, 4]


async def test_a_record_memory_holds_is_read_back_after_a_restart(layout: Layout) -> None:
    """A round of 15,000 rejected selectors (a 5.5 MB line) was served, then skipped at the
    next start-up: lines up to what memory may hold are read back."""
    selectors = [f"selector-{index:05d}.example:50051" for index in range(15_000)]
    rejected = {selector: "r" * 300 for selector in selectors}
    big = ended(2, "FAILED", selectors=selectors, rejected=rejected, reported=[], configured=[])
    await written(RoundLog(layout, keep=10), ended(1), big)
    assert 4 << 20 < len(round_log_path(layout).read_bytes().splitlines()[-1]) < MAX_LINE_BYTES
    again = RoundLog(layout, keep=10).newest()
    assert [record["round"] for record in again] == [2, 1]
    assert len(again[0]["selectors"]) == 15_000


async def test_every_completed_round_of_a_rewrite_gets_its_digest(layout: Layout) -> None:
    """Rounds 4 and 5 end before the writer wakes, and the file is due for a rewrite: round
    5's checkpoint_sha256 stayed None for good (only the first waiting record was digested)."""
    for number in range(1, 6):
        remember(layout, number, keep=10)
    digest = hashlib.sha256(layout.checkpoint.read_bytes()).hexdigest()
    log = RoundLog(layout, keep=2)
    await written(log, ended(1), ended(2), ended(3))
    await written(log, ended(4), ended(5))  # the fourth line would make twice keep: rewritten
    served = [(record["round"], record["checkpoint_sha256"]) for record in log.newest()]
    assert served == [(5, digest), (4, digest)]
    lines = [json.loads(line) for line in round_log_path(layout).read_bytes().splitlines()]
    assert [(line["round"], line["checkpoint_sha256"]) for line in lines] == served[::-1]
