"""The slim install: ``serve``, ``health``, ``watch`` and ``rollback`` without Keras or JAX.

Each command runs as a subprocess whose interpreter cannot import Keras, JAX
or scikit-learn (helpers/without_keras), as in the slim image; ``init``, which
needs Keras, says in one line what to install and writes nothing.
"""

from __future__ import annotations

import re
import signal
import subprocess
import tomllib
from pathlib import Path

import pytest
from helpers import REPO
from helpers.processes import COMMAND, Served, environment, run

WITHOUT_KERAS = REPO / "tests" / "helpers" / "without_keras"

#: The one line of a command that needs Keras where it is missing.
INSTALL_HINT = re.compile(
    r"^fl-coordinator (init|serve): building or loading a Keras model needs keras, which is "
    r"not installed here: pip install 'fl-coordinator\[keras\]' \(or use the full image\)$"
)


def slim(root: Path, **values: str) -> dict[str, str]:
    return environment(root, PYTHONPATH=str(WITHOUT_KERAS), **values)


def test_keras_really_is_missing_there(tmp_path: Path) -> None:
    """The test's premise: the same interpreter, with the helper, cannot import Keras."""
    probe = subprocess.run(
        [COMMAND[0], "-c", "import keras"],
        env=slim(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 1
    assert "ModuleNotFoundError" in probe.stderr and "keras" in probe.stderr


@pytest.mark.parametrize("args", [["init"], ["serve"]])
def test_init_without_keras_is_one_line_and_writes_nothing(tmp_path: Path, args) -> None:
    root = tmp_path / "fresh"
    result = run(args, slim(root))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert INSTALL_HINT.match(lines[-1]), result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "initFiles").exists()  # the next start still sees a new folder


def test_serve_health_watch_rollback_without_keras(settings) -> None:
    root = Path(settings.fl_root_path)
    env = slim(root)
    with Served(env) as server:
        ready = server.wait_for_line("selectors at")
        port, status_url = re.search(r"selectors at \S+:(\d+) \(FlIntra\), status stream at (\S+),",
                                     ready).groups()  # fmt: skip

        health = run(["health", "--address", f"127.0.0.1:{port}"], env)
        assert (health.returncode, health.stdout) == (0, f"127.0.0.1:{port}: SERVING\n")

        watch = subprocess.Popen(
            [*COMMAND, "watch", status_url, "--plain"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert watch.stdout is not None
            first = watch.stdout.readline()
            assert re.search(r"round 1\s+SELECTION\s+clients 0/2", first), first
            watch.send_signal(signal.SIGINT)
            assert watch.wait(timeout=30) == 0
        finally:
            watch.kill()
            watch.wait()

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        assert "Traceback" not in server.rest()

    kept = run(["rollback"], env)
    history = root / ".coordinator" / "history" / "round-000000"
    listing = f"kept checkpoints (round: file, metrics):\n  0: {history}\n"
    assert (kept.returncode, kept.stdout) == (0, listing)
    restored = run(["rollback", "--round", "0"], env)
    assert restored.returncode == 0, restored.stderr
    assert (root / "initFiles" / "fl_checkpoint").read_bytes() == history.read_bytes()


def test_keras_is_an_extra_that_demo_and_test_pull_in() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0] for d in project["dependencies"]}
    assert not names & {"keras", "jax", "jaxlib", "scikit-learn", "tensorflow"}
    extras = project["optional-dependencies"]
    assert {re.split(r"[<>=]", d, maxsplit=1)[0] for d in extras["keras"]} == {"keras", "jax"}
    assert "fl-coordinator[keras]" in extras["demo"]
    assert "fl-coordinator[demo]" in extras["test"]
