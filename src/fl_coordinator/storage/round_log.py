"""The round log: a record of every round that ended, kept on disk so it survives restarts.

``.coordinator/rounds.jsonl`` holds one JSON object per line
(:class:`~..status.rounds.RoundRecord`), a line per ended round and one more
each time its record changes later (the metrics of its evaluation, the end
of the run): the last line of a round is its record. Lines are appended and
fsynced off the event loop, with the SHA-256 of the checkpoint a round
produced (read from its history link, ``history/round-NNNNNN``, which
nothing modifies: the next round's checkpoint is a new file). It is bounded:
once it holds twice ``keep`` lines (or twice :data:`MAX_HISTORY_BYTES`) it
is rewritten (atomically) with the newest ``keep``, and only those are read
at start-up and held in memory; fewer when their records, encoded, would
exceed :data:`MAX_HISTORY_BYTES` (rounds of thousands of selectors each:
2,000 of them held 1.26 GB), the oldest records going first.

It is the coordinator's own file, but a crash can cut its last line short,
and a disk or a hand can leave anything in it: lines that are not a record
(not strict JSON, nested too deep, not a record's shape, longer than
:data:`MAX_LINE_BYTES`) are skipped with one warning, never fatal, and it
is read from its end, no more lines than it can hold: a corrupt or huge
file costs bounded time and memory at start-up.
A record is served from memory as soon as its round ends, its
``checkpoint_sha256`` None until the checkpoint has been read (a moment
later). A write that fails (a full disk) is logged once and the record is
still served from memory; it is lost at the next restart, the round is not.
On shutdown the records not yet written are, within DRAIN_SECONDS.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import trio

from ..errors import os_error_text
from ..status.rounds import ENDED, RoundRecord, record_of
from ..status.schema import StatusMessage
from .atomic import write_atomic
from .journal import history
from .journal_writer import write_when_woken
from .layout import Layout

__all__ = ["MAX_HISTORY_BYTES", "MAX_LINE_BYTES", "RoundLog", "round_log_path"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20

#: The most the records held (and kept in the file) may weigh, as JSON lines: the
#: newest ``ROUND_HISTORY`` rounds of a few hundred bytes each fit many times over;
#: rounds of thousands of selectors are kept fewer (about 6 times this in memory).
MAX_HISTORY_BYTES = 16 << 20

#: The longest line read back: whatever memory may hold is read back after a restart
#: (a record is a few hundred bytes, plus up to a few hundred per selector).
MAX_LINE_BYTES = MAX_HISTORY_BYTES


def round_log_path(layout: Layout) -> Path:
    return layout.own / "rounds.jsonl"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _line(record: RoundRecord) -> bytes:
    return json.dumps(record).encode() + b"\n"


def _is_record(value: Any) -> bool:
    """Whether a parsed line has a record's shape (what the dashboard relies on)."""
    return (
        isinstance(value, dict)
        and type(value.get("round")) is int  # not a bool
        and value.get("outcome") in ENDED
        and isinstance(value.get("stages"), dict)
        and isinstance(value.get("selectors"), list)
    )


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: a page's JSON.parse refuses them


def _parsed(line: bytes | None) -> Any:
    """The value of one line of the file, or None if it is not strict JSON (or too long)."""
    if line is None:
        return None
    try:
        return json.loads(line, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # RecursionError: a line of nested brackets
        return None


def _lines_from_end(file: BinaryIO, max_line: int) -> Iterator[bytes | None]:
    """The file's non-empty lines, last first, read backwards a chunk at a time; None for
    a line longer than ``max_line`` bytes (its bytes are not kept: memory stays bounded)."""
    position = file.seek(0, os.SEEK_END)
    tail = b""  # the end of a line whose start is not read yet
    overlong = False  # that line is longer than max_line (tail holds none of it)
    while position > 0:
        step = min(_CHUNK, position)
        position -= step
        file.seek(position)
        *lines, last = file.read(step).split(b"\n")
        tail = last + tail
        overlong = overlong or len(tail) > max_line
        if overlong:
            tail = b""
        if lines:  # the tail's line starts here: it is complete
            if tail or overlong:
                yield None if overlong else tail
            for line in reversed(lines[1:]):
                if line:
                    yield line if len(line) <= max_line else None
            tail, overlong = lines[0], len(lines[0]) > max_line
            if overlong:
                tail = b""
    if tail or overlong:
        yield None if overlong else tail


def _read(path: Path, keep: int) -> tuple[list[RoundRecord], int]:
    """The records of the newest ``keep`` rounds in the file (fewer if they would weigh more
    than :data:`MAX_HISTORY_BYTES`), by round, and its line count.

    Read from the end: the last line of a round is its record. The file holds
    fewer than ``2 * keep`` lines when this process wrote it; no more are read
    (a longer file counts as ``2 * keep`` lines: the next write rewrites it),
    and a line longer than :data:`MAX_LINE_BYTES` is not parsed, so a
    corrupt or foreign file costs bounded time and memory at start-up.
    """
    records: dict[int, RoundRecord] = {}
    bad = lines = weight = 0
    try:
        with path.open("rb") as file:
            for line in _lines_from_end(file, MAX_LINE_BYTES):
                if len(records) == keep or lines == 2 * keep:
                    lines = 2 * keep
                    break
                lines += 1
                value = _parsed(line)
                if not _is_record(value):
                    bad += 1
                elif value["round"] not in records:
                    weight += len(_line(value))
                    if weight > MAX_HISTORY_BYTES:
                        lines = 2 * keep  # the next write rewrites it with what is held
                        break
                    records[value["round"]] = value
    except FileNotFoundError:
        return [], 0
    if bad:
        log.warning(
            "%s: %d line(s) are not round records (or longer than %d MiB); skipped",
            path,
            bad,
            MAX_LINE_BYTES >> 20,
        )
    return sorted(records.values(), key=lambda record: record["round"]), lines


class RoundLog:
    """The records of the last ``keep`` rounds that ended; run :meth:`run` in a nursery."""

    def __init__(self, layout: Layout, keep: int) -> None:
        self._layout = layout
        self._path = round_log_path(layout)
        self._keep = keep
        records, self._lines = _read(self._path, keep)
        self._records: collections.deque[RoundRecord] = collections.deque(records)
        self._weights = {record["round"]: len(_line(record)) for record in records}
        self._bytes = self._size()  # of the file, which is rewritten at twice the bound
        self._pending: list[RoundRecord] = []
        self._work = trio.Event()
        self._failing = False

    def observe(self, message: StatusMessage) -> None:
        """Keep what a status message says about rounds. Never waits.

        A round that ended (COMPLETED, FAILED) gets its record; the metrics of
        an evaluated round (which arrive during a later round) and the end of the
        run (FINISHED: the reason, in the record of the round it follows) are
        added to the records they belong to; a round that was open when the run
        finished gets a record of its own, outcome FINISHED.
        """
        stage = message["stage"]
        if stage in ENDED:
            known = self._find(message["round"])
            if known is None or stage != "FINISHED":
                self.add(record_of(message))
            elif "finished" not in known:
                self._change(known, finished=message.get("finished", ""))
        metrics = message.get("metrics")
        if metrics:
            evaluated = self._find(metrics["round"])
            if evaluated is not None and evaluated.get("metrics") != metrics["values"]:
                self._change(evaluated, metrics=dict(metrics["values"]))

    def add(self, record: RoundRecord) -> None:
        """Keep ``record`` (it replaces one of the same round); served at once. Never waits."""
        known = self._find(record["round"])
        if known is None:
            self._records.append(record)
        else:
            self._records[self._records.index(known)] = record
        self._weigh(record)
        self._pending.append(record)
        self._work.set()

    def _change(self, record: RoundRecord, **fields: Any) -> None:
        record.update(fields)  # type: ignore[typeddict-item]
        self._weigh(record)
        if not any(waiting is record for waiting in self._pending):
            self._pending.append(record)
        self._work.set()

    def _weigh(self, record: RoundRecord) -> None:
        """Count ``record``'s weight, then let the oldest records go while there are more
        than ``keep`` or they weigh more than :data:`MAX_HISTORY_BYTES` (never the newest)."""
        self._weights[record["round"]] = len(_line(record))
        while len(self._records) > 1 and (
            len(self._records) > self._keep or sum(self._weights.values()) > MAX_HISTORY_BYTES
        ):
            del self._weights[self._records.popleft()["round"]]

    def _find(self, number: int) -> RoundRecord | None:
        """The record of round ``number`` (the newest are looked at first)."""
        for record in reversed(self._records):
            if record["round"] == number:
                return record
        return None

    def newest(self, before: int | None = None, limit: int = 100) -> list[RoundRecord]:
        """Up to ``limit`` records, newest first, of rounds numbered below ``before`` if given."""
        found: list[RoundRecord] = []
        for record in reversed(self._records):
            if len(found) == limit:
                break
            if before is None or record["round"] < before:
                found.append(record)
        return found

    async def run(self) -> None:
        """Write records as rounds end, until cancelled; then, briefly, the ones left."""
        await write_when_woken(self._woken, self._write_pending, self._write_pending)

    async def _woken(self) -> None:
        await self._work.wait()
        self._work = trio.Event()

    async def _write_pending(self) -> None:
        while self._pending:
            record = self._pending[0]  # taken off once written: a cancellation may come first
            try:
                await self._fill_digest(record)
                if (  # rewritten with the newest only
                    self._lines + 1 >= 2 * self._keep
                    or self._bytes + self._weights.get(record["round"], 0) > 2 * MAX_HISTORY_BYTES
                ):
                    held = len(self._pending)  # each of them is in the rewrite
                    for waiting in self._pending[1:held]:
                        await self._fill_digest(waiting)
                    await trio.to_thread.run_sync(self._rewrite, list(self._records))
                    del self._pending[1:held]
                else:
                    await trio.to_thread.run_sync(self._append, record)
            except OSError as error:
                self._failed(record, error)
            else:
                if self._failing:
                    log.warning("the round log %s is written again", self._path)
                self._failing = False
            self._pending.pop(0)

    async def _fill_digest(self, record: RoundRecord) -> None:
        """A completed round's record gets its checkpoint's SHA-256 before it is written."""
        if record["outcome"] == "COMPLETED" and record["checkpoint_sha256"] is None:
            digest = await trio.to_thread.run_sync(self._digest, record["round"])
            record["checkpoint_sha256"] = digest

    def _digest(self, number: int) -> str | None:
        """The SHA-256 of the checkpoint round ``number`` produced (None: it is not kept)."""
        kept = history(self._layout).get(number)
        return _sha256(kept) if kept is not None else None

    def _failed(self, record: RoundRecord, error: OSError) -> None:
        if not self._failing:
            log.error(
                "round %d: cannot write its record to %s (%s); served until a restart",
                record["round"],
                self._path,
                os_error_text(error),
            )
        self._failing = True

    def _size(self) -> int:
        try:
            return self._path.stat().st_size
        except OSError:
            return 0

    def _append(self, record: RoundRecord) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        line = _line(record)
        with self._path.open("ab") as file:
            file.write(line)
            file.flush()
            os.fsync(file.fileno())
        self._lines += 1
        self._bytes += len(line)

    def _rewrite(self, records: list[RoundRecord]) -> None:
        content = b"".join(map(_line, records))
        write_atomic(self._path, content, self._layout.tmp)
        self._lines = len(records)
        self._bytes = len(content)
