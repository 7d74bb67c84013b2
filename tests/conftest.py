"""Shared fixtures: a real problem folder made by Keras once per session, copied per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers.browser import CHROMIUM, HOW_TO_GET_CHROMIUM
from helpers.netns import network  # noqa: F401 (hosts of their own: a fixture for every module)
from helpers.pki import pki  # noqa: F401 (the session's certificates, a fixture for every module)
from helpers.selector_fs import HOW_TO_GET_FUSE

from fl_coordinator.config import Settings, default_settings
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.model import builtin_model
from fl_coordinator.storage.problem import init_problem

#: Keras weights files of the built-in model with these seeds stand in for
#: selector aggregates: real files written by real Keras, all different.
AGGREGATE_SEEDS = (1, 2, 3, 4)


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("template")
    settings = default_settings().replace(fl_root_path=str(base / "problem"))
    init_problem(Layout.from_settings(settings))
    for seed in AGGREGATE_SEEDS:
        builtin_model(seed=seed).save_weights(base / f"seed{seed}.weights.h5")
    return base


@pytest.fixture(scope="session")
def keras_weights(template: Path) -> list[Path]:
    """Real Keras 3 weights files (same layout as the checkpoint, other values)."""
    return [template / f"seed{seed}.weights.h5" for seed in AGGREGATE_SEEDS]


@pytest.fixture
def settings(template: Path, tmp_path: Path) -> Settings:
    """A fresh copy of the problem folder, served on loopback with free ports."""
    root = tmp_path / "root"
    shutil.copytree(template / "problem", root)
    return default_settings().replace(
        fl_root_path=str(root), host="127.0.0.1", port=0, status_port=0, goal_count_timeout=5.0
    )


@pytest.fixture
def layout(settings: Settings) -> Layout:
    return Layout.from_settings(settings)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly which tests could not run here (no browser, no FUSE), and how to run them."""
    for mark, title, missing, how in (
        ("browser", "BROWSER TESTS NOT RUN", f"{CHROMIUM} is missing", HOW_TO_GET_CHROMIUM),
        ("fuse", "FUSE TESTS NOT RUN", "/dev/fuse or fusermount3 is missing", HOW_TO_GET_FUSE),
    ):
        skipped = [
            report.nodeid
            for report in terminalreporter.stats.get("skipped", [])
            if mark in report.keywords
        ]
        if skipped:
            terminalreporter.write_sep("!", title, red=True, bold=True)
            terminalreporter.write_line(f"{missing}, so these tests did not run:")
            for nodeid in skipped:
                terminalreporter.write_line(f"  {nodeid}")
            terminalreporter.write_line(f"Get them with: {how}", bold=True)
