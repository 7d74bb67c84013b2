"""The round log: a record of every round that ended, kept on disk so it survives restarts.

``.coordinator/rounds.jsonl`` holds one JSON object per line, one line per
ended round (:class:`~..status.rounds.RoundRecord`), appended and fsynced
off the event loop when the round ends, with the SHA-256 of the checkpoint
it produced (read from its history link, ``history/round-NNNNNN``, which
nothing modifies: the next round's checkpoint is a new file). It is bounded:
once it holds twice ``keep`` lines it is rewritten (atomically) with the
newest ``keep``, and only those are read at start-up and held in memory.

It is the coordinator's own file, but a crash can cut its last line short:
lines that are not a record are skipped (with one warning), never fatal.
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
from pathlib import Path
from typing import Any

import trio

from ..errors import os_error_text
from ..status.rounds import RoundRecord
from .atomic import write_atomic
from .journal import history
from .journal_writer import DRAIN_SECONDS
from .layout import Layout

__all__ = ["RoundLog", "round_log_path"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


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
    return isinstance(value, dict) and isinstance(value.get("round"), int)


def _read(path: Path, keep: int) -> tuple[list[RoundRecord], int]:
    """The newest ``keep`` records of the file, and how many lines it has."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return [], 0
    records: list[RoundRecord] = []
    bad = 0
    for line in lines[-keep:]:
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if _is_record(value):
            records.append(value)
        else:
            bad += 1
    if bad:
        log.warning("%s: %d line(s) are not round records; skipped", path, bad)
    return records, len(lines)


class RoundLog:
    """The records of the last ``keep`` rounds that ended; run :meth:`run` in a nursery."""

    def __init__(self, layout: Layout, keep: int) -> None:
        self._layout = layout
        self._path = round_log_path(layout)
        self._keep = keep
        records, self._lines = _read(self._path, keep)
        self._records: collections.deque[RoundRecord] = collections.deque(records, maxlen=keep)
        self._pending: list[RoundRecord] = []
        self._work = trio.Event()
        self._failing = False

    def add(self, record: RoundRecord) -> None:
        """Keep ``record`` (a round that just ended; served at once). Never waits."""
        self._records.append(record)
        self._pending.append(record)
        self._work.set()

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
        try:
            while True:
                await self._work.wait()
                self._work = trio.Event()
                await self._write_pending()
        finally:
            with trio.CancelScope(deadline=trio.current_time() + DRAIN_SECONDS, shield=True):
                await self._write_pending()

    async def _write_pending(self) -> None:
        while self._pending:
            record = self._pending[0]  # taken off once written: a cancellation may come first
            kept = history(self._layout).get(record["round"])
            try:
                if record["outcome"] == "COMPLETED" and kept is not None:
                    record["checkpoint_sha256"] = await trio.to_thread.run_sync(_sha256, kept)
                if self._lines + 1 >= 2 * self._keep:  # rewritten with the newest only
                    newest = list(self._records)[-self._keep :]
                    await trio.to_thread.run_sync(self._rewrite, newest)
                else:
                    await trio.to_thread.run_sync(self._append, record)
            except OSError as error:
                self._failed(record, error)
            else:
                if self._failing:
                    log.warning("the round log %s is written again", self._path)
                self._failing = False
            self._pending.pop(0)

    def _failed(self, record: RoundRecord, error: OSError) -> None:
        if not self._failing:
            log.error(
                "round %d: cannot write its record to %s (%s); served until a restart",
                record["round"],
                self._path,
                os_error_text(error),
            )
        self._failing = True

    def _append(self, record: RoundRecord) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._path.open("ab") as file:
            file.write(_line(record))
            file.flush()
            os.fsync(file.fileno())
        self._lines += 1

    def _rewrite(self, records: list[RoundRecord]) -> None:
        write_atomic(self._path, b"".join(map(_line, records)), self._layout.tmp)
        self._lines = len(records)
