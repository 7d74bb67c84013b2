"""Durability: the round journal and the history of global checkpoints.

The journal (``.coordinator/journal.json``) records the round number, stage
and participants at each stage change, replaced atomically and fsynced, so a
restarted coordinator continues numbering where it stopped (its one writer,
which survives a full disk, is :mod:`.journal_writer`). The history
(``.coordinator/history/round-NNNNNN``) keeps the checkpoint each completed
round produced, so a bad round can be rolled back. Each is linked, not
copied, when its round completes (the checkpoint is only ever replaced by
rename, never modified in place), but the next round's rename leaves it the
only name of its file: apart from the newest, which shares its blocks with
the global checkpoint, every kept checkpoint is a file of its own on disk
(:func:`history_usage`). Beside each kept checkpoint ``round-NNNNNN`` the
history may keep files of the same round (``round-NNNNNN.state.h5``, the
server optimizer's state; ``round-NNNNNN.metrics.json``, its evaluation),
pruned with it (:func:`kept_file`).

On restart, a round that was interrupted in SELECTION is opened again with
its number (nothing of it was acted upon: no selector had been told). A
round interrupted later is abandoned, except when it was aggregating and
the checkpoint on disk is no longer the last one in the history: then its
aggregation had finished (the rename happened) and the round is recorded as
completed. Nothing of this lives under ``initFiles/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.stages import Stage
from ..core.stopping import RoundMetrics
from ..errors import ConfigError, ProblemError, os_error_text
from ..untrusted_text import shown
from .atomic import fsync_dir, write_atomic
from .layout import Layout

__all__ = [
    "Entry",
    "checkpoint_round",
    "history",
    "history_usage",
    "journal_path",
    "keep_in_history",
    "kept_file",
    "next_round",
    "read_journal",
    "remember",
    "rollback",
    "write_journal",
]

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^round-(\d{6,})$")
#: A file kept beside a round's checkpoint: ``round-NNNNNN.<what>``.
_COMPANION = re.compile(r"^round-(\d{6,})\.")


@dataclass(frozen=True)
class Entry:
    """One journal record: where the round stood at a stage change."""

    round: int
    stage: str
    aggregating: bool = False
    selectors: list[str] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)
    time: str = ""
    #: The last evaluated metrics: ``{"round": N, "values": {name: value}}`` (None: none yet).
    metrics: dict[str, Any] | None = None
    #: With stage FINISHED: why the run ended.
    finished: str | None = None


def journal_path(layout: Layout) -> Path:
    return layout.own / "journal.json"


def _history_dir(layout: Layout) -> Path:
    return layout.own / "history"


def read_journal(layout: Layout) -> Entry | None:
    path = journal_path(layout)
    if not path.exists():
        return None
    try:
        entry = _entry(json.loads(path.read_text()))
        if entry.round < 1:
            raise ValueError("round < 1")
        if entry.metrics is not None:
            RoundMetrics.from_dict(entry.metrics)
    # RecursionError: json.loads on deeply nested brackets.
    except (ValueError, TypeError, KeyError, RecursionError) as error:
        raise ProblemError(
            f"{path}: not a readable round journal ({error}); move it away to "
            "start counting rounds from the history"
        ) from None
    return entry


#: JSON's names for what ``json.loads`` returns, to say what was found instead.
_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "true or false", type(None): "null"}  # fmt: skip


def _entry(data: object) -> Entry:
    """The entry the journal's JSON describes; ValueError saying what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError(f"expected one JSON object, found {_JSON_KINDS[type(data)]}")
    known = {f.name for f in dataclasses.fields(Entry)}
    if unknown := sorted(set(data) - known):
        raise ValueError(f"unknown key '{shown(unknown[0], 60)}' ({len(unknown)} unknown)")
    if missing := [name for name in ("round", "stage") if name not in data]:
        raise ValueError(f"no {' or '.join(missing)} key")
    if type(data["round"]) is not int or not isinstance(data["stage"], str):
        raise ValueError("round must be a whole number and stage a string")
    if data["stage"] not in _STAGES:
        raise ValueError(
            f"stage '{shown(data['stage'], 60)}' is none of {', '.join(sorted(_STAGES))}"
        )
    for name, (fits, said) in _SHAPES.items():
        if name in data and not fits(value := data[name]):
            found = _JSON_KINDS[type(value)]
            if type(value) is list and said.startswith("an array"):
                found += " holding other values"
            raise ValueError(f"{name} must be {said}, found {found}")
    return Entry(**data)


#: The stages a journal can name.
_STAGES = frozenset(stage.name for stage in Stage)


def _ids(value: object) -> bool:
    return type(value) is list and all(type(item) is str for item in value)


#: What the entry's other keys must hold, and how to say it: a hand-edited
#: ``"aggregating": "no"`` would otherwise be taken as true.
_SHAPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "aggregating": (lambda value: type(value) is bool, "true or false"),
    "selectors": (_ids, "an array of selector ids (strings)"),
    "reported": (_ids, "an array of selector ids (strings)"),
    "time": (lambda value: type(value) is str, "a string"),
    "metrics": (lambda value: value is None or type(value) is dict, "an object or null"),
    "finished": (lambda value: value is None or type(value) is str, "a string or null"),
}


def write_journal(layout: Layout, entry: Entry) -> None:
    write_atomic(journal_path(layout), json.dumps(asdict(entry)).encode(), layout.tmp)


def kept_file(layout: Layout, round_number: int, suffix: str = "") -> Path:
    """The kept checkpoint of ``round_number`` (``suffix`` empty), or a file kept beside it."""
    return _history_dir(layout) / f"round-{round_number:06d}{suffix}"


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
    dest = kept_file(layout, round_number)
    dest.unlink(missing_ok=True)
    os.link(layout.checkpoint, dest)
    for old in list(history(layout))[:-keep] if keep > 0 else []:
        kept_file(layout, old).unlink(missing_ok=True)
    _prune_companions(layout)
    return dest


def _prune_companions(layout: Layout) -> None:
    """Remove the files kept beside checkpoints that are no longer kept (or never were:
    the state of a round whose checkpoint never made it into place)."""
    kept = set(history(layout))
    with contextlib.suppress(FileNotFoundError):
        for path in _history_dir(layout).iterdir():
            match = _COMPANION.match(path.name)
            if match and int(match.group(1)) not in kept:
                path.unlink(missing_ok=True)


def keep_in_history(layout: Layout, round_number: int, keep: int) -> None:
    """:func:`remember`, for a round that has completed: a failure is logged, not raised.

    The new checkpoint is in place by then; a full disk must not turn the
    round into a failure (nor end the process). Rollback to it is what is lost.
    """
    try:
        remember(layout, round_number, keep)
    except OSError as error:
        log.error(
            "round %d: completed, but its checkpoint could not be kept in %s (%s)",
            round_number,
            _history_dir(layout),
            os_error_text(error),
        )


def history_usage(layout: Layout) -> tuple[int, int]:
    """(files, bytes) of the kept files that are not also the global checkpoint.

    What the history costs on disk beyond the checkpoint itself: up to
    KEEP_CHECKPOINTS - 1 files of a checkpoint's size (the newest shares its
    blocks with the global checkpoint through a hard link), plus what is kept
    beside them (an optimizer's state: up to twice the checkpoint's values).
    """
    seen: set[tuple[int, int]] = set()
    with contextlib.suppress(OSError):
        current = layout.checkpoint.stat()
        seen.add((current.st_dev, current.st_ino))
    files = size = 0
    kept = history(layout)
    companions = [
        path
        for path in (_history_dir(layout).iterdir() if kept else ())
        if (match := _COMPANION.match(path.name)) and int(match.group(1)) in kept
    ]
    for path in [*kept.values(), *sorted(companions)]:
        try:
            stat = path.stat()
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            files += 1
            size += stat.st_blocks * 512
    return files, size


def _same_file(a: Path, b: Path) -> bool:
    return os.path.samefile(a, b) if a.exists() and b.exists() else False


def checkpoint_round(layout: Layout) -> int | None:
    """The round that produced the checkpoint in place, as far as the history knows."""
    for number, path in sorted(history(layout).items(), reverse=True):
        if _same_file(layout.checkpoint, path):
            return number
    return None


def next_round(layout: Layout, keep: int) -> int:
    """The round to open at start-up, after settling what the journal says was under way.

    Raises ProblemError if the coordinator's own files cannot be written.
    """
    try:
        number = _settle(layout, keep)
    except OSError as error:
        raise ProblemError(
            f"cannot write the coordinator's own files in {layout.own} "
            f"({os_error_text(error)}): free space on FL_ROOT_PATH or make it writable"
        ) from None
    files, size = history_usage(layout)
    log.info(
        "%d kept round(s) in %s: %d file(s), %.1f MB of disk besides the global checkpoint "
        "(KEEP_CHECKPOINTS=%d)",
        len(history(layout)),
        _history_dir(layout),
        files,
        size / 1e6,
        keep,
    )
    _say_if_restored(layout, number)
    return number


def _say_if_restored(layout: Layout, number: int) -> None:
    """Log it when the global checkpoint is an older kept round's: a rollback restored it
    while no coordinator ran, so this start is the first any log can say so."""
    restored = checkpoint_round(layout)
    kept = history(layout)
    if restored is not None and restored < max(kept, default=restored):
        log.warning(
            "round %d starts from the checkpoint of round %d, restored by rollback (the "
            "newest kept round is %d)",
            number,
            restored,
            max(kept),
        )


def _settle(layout: Layout, keep: int) -> int:
    number = _settle_journal(layout, keep)
    _prune_companions(layout)  # e.g. the state of a round whose checkpoint never made it
    return number


def _settle_journal(layout: Layout, keep: int) -> int:
    entry = read_journal(layout)
    kept = history(layout)
    if not kept:
        remember(layout, entry.round if entry else 0, keep)
    if entry is None:
        return 1
    if entry.stage in ("COMPLETED", "FAILED", "FINISHED"):
        return entry.round + 1
    if entry.stage == "SELECTION":
        log.info("round %d was in selection when stopped: opened again", entry.round)
        return entry.round
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
