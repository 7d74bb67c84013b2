"""The shared-storage layout of one FL problem, and the checks of selector ids that name folders.

Existing selectors walk ``initFiles/`` recursively and stream every file they
find to every client, so the coordinator never leaves anything of its own
there: temporary files and history live in ``.coordinator/`` beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from ..errors import InvalidSelectorId

__all__ = ["Layout", "check_selector_id"]

#: Longest selector id we accept: an id is a folder name (255 bytes on most
#: file systems) and also a ``host:port`` we dial.
_MAX_SELECTOR_ID_BYTES = 255

_COORDINATOR_DIR = ".coordinator"


#: C0 controls and DEL. A regex, not a loop over characters: this runs on every
#: check-in (it was a tenth of the coordinator's own cost per check-in).
def check_selector_id(selector_id: str) -> str:
    """Return ``selector_id`` if it is a safe, single path component; raise otherwise.

    The id names a folder under the root, so it must never reach outside it
    (``..``, separators, absolute paths) or smuggle a NUL into a system call.
    """
    if not selector_id:
        raise InvalidSelectorId("selector id is empty")
    if len(selector_id.encode("utf-8", "surrogatepass")) > _MAX_SELECTOR_ID_BYTES:
        raise InvalidSelectorId(
            f"selector id is longer than {_MAX_SELECTOR_ID_BYTES} bytes ({len(selector_id)} chars)"
        )
    if "\0" in selector_id:
        raise InvalidSelectorId(f"selector id {selector_id!r} contains a NUL character")
    if "/" in selector_id or "\\" in selector_id:
        raise InvalidSelectorId(f"selector id {selector_id!r} contains a path separator")
    if selector_id in (".", ".."):
        raise InvalidSelectorId(f"selector id {selector_id!r} is not a folder name")
    if not selector_id.isprintable():
        # Control characters of every kind (C0, DEL, C1 such as NEL and CSI), line and
        # paragraph separators, bidi overrides: none belongs in a host name, a folder
        # name or a log line.
        raise InvalidSelectorId(f"selector id {selector_id!r} contains a non-printable character")
    return selector_id


@dataclass(frozen=True)
class Layout:
    """Paths of one problem folder, derived from the settings."""

    root: Path
    init_files: Path
    checkpoint: Path
    model: Path
    agg_checkpoint_name: str
    agg_weight_name: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Layout:
        root = settings.root
        init_files = root / settings.init_files_path.strip("/")
        return cls(
            root=root,
            init_files=init_files,
            checkpoint=init_files / settings.checkpoint_file.strip("/"),
            model=init_files / settings.model_file.strip("/"),
            agg_checkpoint_name=settings.agg_checkpoint_file_path.strip("/"),
            agg_weight_name=settings.agg_checkpoint_weight_path.strip("/"),
        )

    @property
    def own(self) -> Path:
        """The coordinator's private folder (never sent to clients)."""
        return self.root / _COORDINATOR_DIR

    @property
    def tmp(self) -> Path:
        return self.own / "tmp"

    def selector_dir(self, selector_id: str) -> Path:
        return self.root / check_selector_id(selector_id)

    def agg_checkpoint(self, selector_id: str) -> Path:
        return self.selector_dir(selector_id) / self.agg_checkpoint_name

    def agg_weight(self, selector_id: str) -> Path:
        return self.selector_dir(selector_id) / self.agg_weight_name
