"""Durability: the round journal and the history of global checkpoints.

The journal (``.coordinator/journal.json``) records the round number, stage
and participants at each stage change, replaced atomically and fsynced, so a
restarted coordinator continues numbering where it stopped. The history
(``.coordinator/history/round-NNNNNN``) keeps the checkpoint each completed
round produced as a hard link (no copy: the checkpoint is only ever replaced
by rename, never modified in place), so a bad round can be rolled back.

On restart, a round that was interrupted is abandoned, except when it was
aggregating and the checkpoint on disk is no longer the last one in the
history: then its aggregation had finished (the rename happened) and the
round is recorded as completed; and a round still selecting with no client
accepted, in which nothing happened, simply opens again with its number.
Nothing of this lives under ``initFiles/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ProblemError
from .atomic import fsync_dir, write_atomic
from .layout import Layout

__all__ = [
    "Entry",
    "history",
    "next_round",
    "read_journal",
    "remember",
    "rollback",
    "write_journal",
]

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^round-(\d{6,})$")


@dataclass(frozen=True)
class Entry:
    """One journal record: where the round stood at a stage change."""

    round: int
    stage: str
    aggregating: bool = False
    selectors: list[str] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)
    time: str = ""


def _journal_path(layout: Layout) -> Path:
    return layout.own / "journal.json"


def _history_dir(layout: Layout) -> Path:
    return layout.own / "history"


def read_journal(layout: Layout) -> Entry | None:
    path = _journal_path(layout)
    if not path.exists():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        entry = Entry(**data)
        if entry.round < 1:
            raise ValueError("round < 1")
    except (ValueError, TypeError) as error:
        raise ProblemError(
            f"{path}: not a readable round journal ({error}); move it away to "
            "start counting rounds from the history"
        ) from None
    return entry


def write_journal(layout: Layout, entry: Entry) -> None:
    write_atomic(_journal_path(layout), json.dumps(asdict(entry)).encode(), layout.tmp)


def history(layout: Layout) -> dict[int, Path]:
    """Kept checkpoints by the round that produced them (0 = the initial one)."""
    folder = _history_dir(layout)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _ENTRY.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def remember(layout: Layout, round_number: int, keep: int) -> Path:
    """Link the current checkpoint into the history as ``round_number``; prune old ones."""
    folder = _history_dir(layout)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"round-{round_number:06d}"
    dest.unlink(missing_ok=True)
    os.link(layout.checkpoint, dest)
    for old in list(history(layout))[:-keep] if keep > 0 else []:
        (folder / f"round-{old:06d}").unlink(missing_ok=True)
    return dest


def _same_file(a: Path, b: Path) -> bool:
    return os.path.samefile(a, b) if a.exists() and b.exists() else False


def next_round(layout: Layout, keep: int) -> int:
    """The round to open at start-up, after settling what the journal says was under way."""
    entry = read_journal(layout)
    kept = history(layout)
    if not kept:
        remember(layout, entry.round if entry else 0, keep)
    if entry is None:
        return 1
    if entry.stage in ("COMPLETED", "FAILED"):
        return entry.round + 1
    if entry.stage == "SELECTION" and not entry.selectors:
        return entry.round  # nothing happened in it: the same round opens again
    last = kept[max(kept)] if kept else None
    finished = entry.round in kept or (last is not None and not _same_file(layout.checkpoint, last))
    if entry.aggregating and finished:
        remember(layout, entry.round, keep)
        log.warning(
            "round %d finished aggregating before the restart: kept as completed", entry.round
        )
        write_journal(layout, dataclasses.replace(entry, stage="COMPLETED", aggregating=False))
    else:
        log.warning(
            "round %d was interrupted in %s by the restart: abandoned, global "
            "checkpoint kept as it was",
            entry.round,
            entry.stage,
        )
        write_journal(layout, dataclasses.replace(entry, stage="FAILED", aggregating=False))
    return entry.round + 1


def rollback(layout: Layout, round_number: int) -> Path:
    """Make the checkpoint kept for ``round_number`` the global checkpoint again."""
    kept = history(layout)
    if round_number not in kept:
        available = ", ".join(map(str, kept)) or "none"
        raise ConfigError("--round", round_number, f"a kept round (available: {available})")
    tmp = layout.tmp / f".rollback-{round_number}"
    layout.tmp.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    os.link(kept[round_number], tmp)
    os.replace(tmp, layout.checkpoint)
    fsync_dir(layout.checkpoint.parent)
    return kept[round_number]
