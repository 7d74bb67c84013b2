"""The public surface: what the package exports, what each module exports, what a command loads.

After trio's ``test_exports.py`` and httpx's ``test_exported_members.py``.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.processes import COMMAND, Served, environment

import fl_coordinator

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(fl_coordinator.__path__, "fl_coordinator.")
    if "._proto" not in info.name and not info.name.endswith("__main__")
)

#: What the operator commands must never load: the ML stack and the reference programs.
HEAVY = ("keras", "jax", "sklearn", "fl_coordinator.federation")


def test_the_package_exports_what_an_embedding_program_needs() -> None:
    exported = set(fl_coordinator.__all__)
    assert {"serve", "Settings", "load_settings", "StatusMessage", "Stage"} <= exported
    errors = importlib.import_module("fl_coordinator.errors")
    tree = {
        name
        for name in errors.__all__
        if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), Exception)
    }
    assert tree <= exported  # the whole exception tree
    for name in fl_coordinator.__all__:
        assert getattr(fl_coordinator, name) is not None, name
    assert fl_coordinator.serve is importlib.import_module("fl_coordinator.app").serve
    with pytest.raises(AttributeError):
        fl_coordinator.no_such_name  # noqa: B018


@pytest.mark.parametrize("name", MODULES)
def test_every_module_declares_what_it_exports(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    for item in exported:
        assert not item.startswith("_"), f"{name} exports private {item}"
        assert hasattr(module, item), f"{name}.__all__ names {item}, which it lacks"


def loaded_by(code: str) -> set[str]:
    """The top-level names of the modules a fresh interpreter loads to run ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return set(out.split())


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.startswith(HEAVY)}


def test_importing_the_package_is_light() -> None:
    """Not even the settings: the command line imports the package before it can turn a
    Ctrl-C into one line, and they took 0.1 s (YAML, the events, the status schema)."""
    modules = loaded_by("import fl_coordinator")
    assert heavy(modules) == set()
    assert {"trio", "purerpc", "h5py", "yaml", "fl_coordinator.config"} & modules == set()
    listed = loaded_by("import fl_coordinator\nprint(*dir(fl_coordinator))")
    assert set(fl_coordinator.__all__) <= listed  # the names not loaded yet included


def imported_by(args: list[str], **run: object) -> set[str]:
    """Modules ``python -X importtime -m fl_coordinator ARGS`` imported (from its stderr)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *COMMAND[1:], *args],
        capture_output=True,
        text=True,
        timeout=120,
        **run,  # type: ignore[arg-type]
    )
    return _importtime_modules(result.stderr)


def _importtime_modules(stderr: str) -> set[str]:
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def test_health_help_loads_no_ml_stack_and_no_reference_programs() -> None:
    modules = imported_by(["health", "--help"])
    assert "fl_coordinator.cli.main" in modules  # the measurement sees our own imports
    assert heavy(modules) == set()


def test_serve_loads_no_ml_stack_and_no_reference_programs(settings) -> None:
    env = environment(Path(settings.fl_root_path))
    served = Served(env, [sys.executable, "-X", "importtime", *COMMAND[1:], "serve"])
    served.wait_for_line("selectors at")
    served.process.send_signal(signal.SIGTERM)
    modules = _importtime_modules(served.rest())
    assert served.process.wait(timeout=60) == 0
    assert {"fl_coordinator.app", "h5py", "purerpc"} <= modules
    assert heavy(modules) == set()


def test_the_demo_keeps_its_own_flags() -> None:
    result = subprocess.run(
        [*COMMAND, "demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "--rounds" in result.stdout and "(default: 10)" in result.stdout


def _development_tree() -> list[str]:
    """The README's module tree: the first code block of its Development section."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Development") :]
    start = section.index("```\n") + 4
    return section[start : section.index("```", start)].splitlines()


def _folder_lines(tree: list[str], folder: str) -> str:
    """The lines of ``  folder/`` in the tree, up to the next entry of the package's level."""
    start = tree.index(next(line for line in tree if line.startswith(f"  {folder}/ ")))
    end = next(
        (i for i in range(start + 1, len(tree)) if re.match(r"^(  )?\S", tree[i])), len(tree)
    )
    return "\n".join(tree[start:end])


@pytest.mark.parametrize("name", MODULES)
def test_every_module_has_its_line_in_the_readme_tree(name: str) -> None:
    """The Development section's tree names every module, in its folder (issue 10)."""
    if hasattr(importlib.import_module(name), "__path__"):
        return  # a folder: its modules are checked one by one
    tree = _development_tree()
    folders, module = name.split(".")[1:-1], name.split(".")[-1]
    if not folders:
        assert any(re.match(rf"^  {module}\.py\b", line) for line in tree), name
    else:
        assert re.search(rf"\b{module}\.py\b", _folder_lines(tree, folders[0])), name
