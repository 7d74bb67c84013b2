"""Files the coordinator publishes keep the mode of the files they replace.

On a shared volume the selectors, the webserver or a Go selector may run as
other users; they read the new global checkpoint as they read the old one.
Tests run as root (CI does): the reader here is the user ``nobody``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers.peers import one_selector_round

from fl_coordinator.config import Settings
from fl_coordinator.storage.atomic import write_atomic
from fl_coordinator.storage.layout import Layout

OTHER_USER = "nobody"


def read_as_other_user(path: Path) -> subprocess.CompletedProcess[bytes]:
    """``cat path`` as ``nobody``: its uid, its own group, no supplementary groups."""
    if os.geteuid() != 0:
        pytest.fail(
            f"this test reads a file as {OTHER_USER!r}, which needs root (CI runs as root); "
            f"uid here is {os.geteuid()}"
        )
    user = pwd.getpwnam(OTHER_USER)
    return subprocess.run(
        ["cat", str(path)],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        capture_output=True,
        timeout=30,
    )


@pytest.fixture
def shared(settings: Settings) -> Iterator[Settings]:
    """The problem folder somewhere ``nobody`` may traverse (pytest's tmp_path is 0700)."""
    volume = Path(tempfile.mkdtemp(prefix="fl-shared-"))
    root = volume / "problem"
    shutil.copytree(settings.fl_root_path, root)
    for folder in (volume, root, *(p for p in root.rglob("*") if p.is_dir())):
        folder.chmod(0o755)
    yield settings.replace(fl_root_path=str(root))
    shutil.rmtree(volume)


@pytest.mark.parametrize("mode", [0o644, 0o640])
async def test_new_checkpoint_keeps_the_mode_of_the_old_one(
    shared: Settings, keras_weights, nursery: trio.Nursery, mode: int
) -> None:
    checkpoint = Layout.from_settings(shared).checkpoint
    checkpoint.chmod(mode)
    old = checkpoint.stat()

    done = await one_selector_round(nursery, shared, keras_weights[0], weight=3)

    assert done["stage"] == "COMPLETED", done
    new = checkpoint.stat()
    assert new.st_ino != old.st_ino  # replaced, not modified in place
    assert stat.S_IMODE(new.st_mode) == mode
    read = read_as_other_user(checkpoint)
    if mode & stat.S_IROTH:
        assert (read.returncode, read.stdout) == (0, checkpoint.read_bytes())
    else:  # kept as restrictive as it was
        assert read.returncode == 1 and b"Permission denied" in read.stderr


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_a_new_file_gets_the_umask_default(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "journal.json", b"{}", tmp_path / "tmp")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "journal.json").stat().st_mode) == mode


def test_the_other_user_exists() -> None:
    """The premise of the tests above: ``nobody`` is a user without root's rights."""
    user = pwd.getpwnam(OTHER_USER)
    assert user.pw_uid != 0 and user.pw_gid != 0
