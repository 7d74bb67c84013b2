"""The privacy ledger: every round released under differential privacy, kept for good.

``.coordinator/privacy.json`` lists each round whose aggregation ran with
noise, with its mechanism (``q``, ``z``, ``C``). The epsilon spent so far is
recomputed from it (:func:`..core.privacy.epsilon`), never stored, so a change
of accountant cannot leave a stale figure behind.

Nothing may give budget back:

* A round is recorded *before* its aggregation starts (write-ahead, fsynced):
  if the new checkpoint is published, its round is in the ledger, whatever
  crash follows. A round whose aggregation then fails is counted all the
  same; that overstates epsilon a little and never understates it.
* ``rollback`` restores an older checkpoint, but the rounds released since
  were seen by whoever read them: the ledger lives outside the history and
  rollback never touches it.
* The ledger counts releases, not round numbers: a round number can come
  again (the journal moved away, and counting starts over at round 1), and
  is then one more release. Only a round averaged again in the same run (a
  selector refused while averaging: nothing was written) is not recorded
  twice.
* A ledger that cannot be read stops the start-up (ProblemError: the budget
  is unknown), rather than starting again from zero.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.privacy import DifferentialPrivacy, Release, Spent, epsilon
from ..errors import ConfigError, ProblemError, os_error_text
from .atomic import write_atomic
from .layout import Layout

__all__ = ["PrivacyLedger", "ledger_path"]


def ledger_path(layout: Layout) -> Path:
    return layout.own / "privacy.json"


@dataclass(frozen=True)
class _Entry:
    round: int
    q: float
    z: float
    clip_norm: float


class PrivacyLedger:
    """The released rounds of one problem folder, under mechanism ``privacy``.

    Blocking file work and accounting: call from worker threads (the round
    task does, through :class:`.round_files.RoundFiles`). :meth:`load` raises
    ProblemError for a ledger that cannot be used.
    """

    def __init__(self, layout: Layout, privacy: DifferentialPrivacy) -> None:
        self._layout = layout
        self.privacy = privacy
        self._entries: list[_Entry] | None = None
        self._recorded: set[int] = set()  # rounds this run recorded

    def load(self) -> None:
        """Read the ledger (a missing one is empty); ProblemError if it cannot be used."""
        path = ledger_path(self._layout)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._entries = []
            return
        except OSError as error:
            raise ProblemError(
                f"{path}: cannot read the privacy ledger ({os_error_text(error)})"
            ) from None
        try:
            self._entries = _parse(json.loads(text))
        except (ValueError, TypeError, KeyError) as error:
            raise ProblemError(
                f"{path}: not a readable privacy ledger ({error}); the privacy already spent "
                "is unknown: restore the file from a backup (it is never rewritten with less)"
            ) from None

    def record(self, number: int) -> None:
        """Write ahead that round ``number`` is released under :attr:`privacy` (OSError if
        it cannot be written: the round must then not be aggregated)."""
        entries = self._loaded()
        if number in self._recorded:
            return  # averaged again without a refused selector: the same release
        mechanism = self.privacy.release
        entries.append(_Entry(number, mechanism.q, mechanism.z, self.privacy.clip_norm))
        data = json.dumps({"releases": [vars(entry) for entry in entries]}, indent=1).encode()
        try:
            write_atomic(ledger_path(self._layout), data, self._layout.tmp)
        except OSError:
            entries.pop()
            raise
        self._recorded.add(number)

    def spent(self) -> Spent:
        """Epsilon at DP_DELTA of the released rounds, and after one more (RDP accountant).

        Raises ProblemError if the ledger's rounds have no finite epsilon, ConfigError if one
        more round of DP_NOISE_MULTIPLIER would have none (z too small to bound anything).
        """
        released = [Release(e.q, e.z) for e in self._loaded()]
        delta = self.privacy.delta
        try:
            spent = epsilon(released, delta)
        except OverflowError as error:
            raise ProblemError(
                f"{ledger_path(self._layout)}: {error}: the privacy spent is unbounded"
            ) from None
        try:
            next_epsilon = epsilon([*released, self.privacy.release], delta)
        except OverflowError as error:
            raise ConfigError(
                "DP_NOISE_MULTIPLIER",
                self.privacy.noise_multiplier,
                f"a noise multiplier large enough to bound the privacy spent ({error})",
            ) from None
        return Spent(epsilon=spent, delta=delta, rounds=len(released), next_epsilon=next_epsilon)

    def _loaded(self) -> list[_Entry]:
        if self._entries is None:
            self.load()
        assert self._entries is not None
        return self._entries


def _parse(data: Any) -> list[_Entry]:
    releases = data["releases"]
    if not isinstance(releases, list):
        raise TypeError("releases is not a list")
    entries: list[_Entry] = []
    for item in releases:
        entry = _Entry(
            round=int(item["round"]),
            q=float(item["q"]),
            z=float(item["z"]),
            clip_norm=float(item["clip_norm"]),
        )
        if not (0 < entry.q <= 1 and entry.z >= 0 and math.isfinite(entry.z)):
            raise ValueError(f"round {entry.round}: q={entry.q}, z={entry.z} is not a mechanism")
        entries.append(entry)
    return entries
