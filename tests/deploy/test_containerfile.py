"""The Containerfile, read as text: no container engine on this machine can build it.

These checks hold it to what the README promises: two stages, a non-root
user, a health check through ``fl-coordinator health``, the documented ports
exposed and set, the problem folder as a volume.
"""

from __future__ import annotations

import re
import shlex

from helpers import REPO

from fl_coordinator.config import default_settings

CONTAINERFILE = REPO / "Containerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def arguments(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def env() -> dict[str, str]:
    values: dict[str, str] = {}
    for rest in arguments("ENV"):
        values.update(pair.split("=", 1) for pair in shlex.split(rest))
    return values


def test_two_stages_and_only_the_venv_is_copied() -> None:
    froms = arguments("FROM")
    assert len(froms) == 2
    assert froms[0].endswith(" AS builder")
    assert froms[1] == "${PYTHON_IMAGE}"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in CONTAINERFILE.read_text()
    assert [r for r in arguments("COPY") if r.startswith("--from")] == [
        "--from=builder /opt/venv /opt/venv"
    ]
    assert env()["PATH"].startswith("/opt/venv/bin:")


def test_runs_as_a_non_root_user() -> None:
    (user,) = arguments("USER")
    assert user.split(":")[0] not in ("root", "0")


def test_health_check_uses_the_health_command() -> None:
    (check,) = arguments("HEALTHCHECK")
    command = check[check.index("CMD") + 3 :].strip()
    assert command.startswith('["fl-coordinator", "health"')


def test_exposes_the_documented_ports_and_serves_data() -> None:
    variables = env()
    defaults = default_settings()
    ports = {int(p) for rest in arguments("EXPOSE") for p in rest.split()}
    assert int(variables["PORT"]) == defaults.port
    assert int(variables["STATUS_PORT"]) == defaults.status_port
    assert ports == {int(variables[k]) for k in ("PORT", "STATUS_PORT", "METRICS_PORT")}
    assert variables["HOST"] == "0.0.0.0"
    assert arguments("VOLUME") == [variables["FL_ROOT_PATH"]] == ["/data"]
    assert arguments("CMD")[-1] == '["fl-coordinator", "serve"]'
