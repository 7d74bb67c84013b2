"""A problem folder this user may not write (a fresh volume owned by root): one line, no traceback.

The coordinator runs as root in CI, and root writes anywhere; the commands run
here without the capabilities that let root ignore permissions
(``setpriv --bounding-set``), on a folder owned by ``nobody``, as the image's
user would meet a root-owned volume.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
from pathlib import Path

import pytest
from helpers.processes import COMMAND, environment

WITHOUT_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


@pytest.fixture
def foreign(tmp_path: Path) -> Path:
    """A folder owned by ``nobody``, mode 0755: readable, not writable, by anyone else."""
    if os.geteuid() != 0:
        pytest.fail(f"this test hands a folder to nobody, which needs root; uid is {os.geteuid()}")
    folder = tmp_path / "volume"
    folder.mkdir(mode=0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    return folder


@pytest.mark.parametrize("command", [["init"], ["serve", "--init-if-empty"]])
def test_unwritable_volume_is_one_line(foreign: Path, command: list[str]) -> None:
    root = foreign / "problem"
    result = subprocess.run(
        [*WITHOUT_OVERRIDE, *COMMAND, *command],
        env=environment(root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"fl-coordinator {command[0]}: {foreign / 'problem'}: cannot create {root} \(permission "
        r"denied\): the problem folder must be writable by this user \(uid 0\); on Kubernetes, "
        r"give the pod an fsGroup or hand the volume to that uid",
        last,
    ), result.stderr
    assert "Traceback" not in result.stderr
    assert list(foreign.iterdir()) == []
