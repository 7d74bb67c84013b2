"""``init`` and the first start's initialisation write all of ``initFiles/`` or nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import h5py
import pytest
import trio
from helpers.processes import COMMAND, Served, environment, run
from storage.test_disk_full import _mounted, remount

from fl_coordinator.config import default_settings
from fl_coordinator.errors import ConfigError
from fl_coordinator.storage.checkpoint import read_checkpoint_plan
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.problem import check_problem, init_problem, open_root


def layout_at(root: Path) -> Layout:
    return Layout.from_settings(default_settings().replace(fl_root_path=str(root)))


def complete(layout: Layout) -> bool:
    """initFiles/ holds a model and a checkpoint that serve accepts."""
    return h5py.is_hdf5(layout.model) and len(read_checkpoint_plan(layout.checkpoint)) == 4


async def test_serve_killed_during_its_first_start_leaves_all_or_nothing(tmp_path: Path) -> None:
    root = tmp_path / "fresh"
    layout = layout_at(root)
    first = Served(environment(root), [*COMMAND, "serve", "--init-if-empty"])
    try:
        await trio.to_thread.run_sync(first.wait_for_line, "initialising it with the built-in")
        first.process.send_signal(signal.SIGKILL)  # Keras is still importing: mid-way
        assert await trio.to_thread.run_sync(first.process.wait) == -signal.SIGKILL
    finally:
        if first.process.poll() is None:
            first.process.kill()
    assert not layout.init_files.exists() or complete(layout)
    killed_early = not layout.init_files.exists()

    second = Served(environment(root), [*COMMAND, "serve", "--init-if-empty"])
    try:
        await trio.to_thread.run_sync(second.wait_for_line, "FlIntra")  # it serves
        second.process.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(second.process.wait) == 0
    finally:
        if second.process.poll() is None:
            second.process.kill()
    assert complete(layout)
    assert killed_early == ("initialising it with the built-in" in second.rest())
    assert list(layout.tmp.iterdir()) == []  # the killed one's staging folder is gone


def test_init_that_does_not_fit_leaves_nothing(tmp_path: Path) -> None:
    point = tmp_path / "mnt"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(point)], check=True)
    try:
        root = point / "problem"
        result = run(["init", "--root", str(root)], environment(root))
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert lines[-1] == (
            f"fl-coordinator init: cannot write {root / 'initFiles'} "
            "([Errno 28] No space left on device); nothing was changed"
        ), result.stderr
        assert not (root / "initFiles").exists()
        assert list((root / ".coordinator" / "tmp").iterdir()) == []
    finally:
        subprocess.run(["umount", str(point)], check=True)


def test_init_force_swaps_the_whole_folder_and_keeps_other_files(tmp_path: Path) -> None:
    layout = layout_at(tmp_path / "problem")
    init_problem(layout)
    extra = layout.init_files / "labels.txt"
    extra.write_text("0 1 2 3 4 5 6 7 8 9\n")
    old = {path.name: path.stat().st_ino for path in (layout.model, layout.checkpoint, extra)}
    with pytest.raises(Exception, match="already exists; use --force"):
        init_problem(layout)
    init_problem(layout, force=True)
    assert complete(layout)
    assert extra.read_text() == "0 1 2 3 4 5 6 7 8 9\n" and extra.stat().st_ino == old[extra.name]
    assert layout.model.stat().st_ino != old["model.h5"]
    assert layout.checkpoint.stat().st_ino != old["fl_checkpoint"]
    assert sorted(os.listdir(layout.init_files)) == ["fl_checkpoint", "labels.txt", "model.h5"]
    assert list(layout.tmp.iterdir()) == []  # the old folder, swapped out, is removed


def test_a_root_on_a_read_only_mount_says_so(settings, tmp_path: Path) -> None:
    """EROFS: no permission would help, so the line says the mount is read-only (it said
    "a folder this user (uid 0) can read and write"), at serve's first check and its second."""
    with _mounted(tmp_path / "mnt", "-t", "tmpfs", "-o", "size=4m", "tmpfs") as point:
        root = point / "root"
        shutil.copytree(settings.fl_root_path, root)
        remount(point, "ro")
        layout = Layout.from_settings(settings.replace(fl_root_path=str(root)))
        for check in (open_root, check_problem):
            with pytest.raises(ConfigError) as refused:
                check(layout)
            assert str(refused.value) == (
                f"configuration error: FL_ROOT_PATH='{root}': expected a folder on a writable "
                "file system (it is on a read-only mount: mount it read-write; on Kubernetes, "
                "the volume without readOnly)"
            )
