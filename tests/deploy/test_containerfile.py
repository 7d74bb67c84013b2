"""The Containerfile, read as text (scripts/build-image builds it; too slow for the tests).

These checks hold it to what the README promises: two targets from one file,
slim (the default) without Keras and full with it, both installed from the
wheels only (no network in the build), run as a user without privileges, a
health check through ``fl-coordinator health``, the documented ports exposed
and set, the problem folder as a volume.
"""

from __future__ import annotations

from helpers.containerfile import CONTAINERFILE, arguments, image_env, instructions, stages

from fl_coordinator.config import default_settings


def test_two_targets_slim_by_default() -> None:
    names = list(stages())
    assert names[-1] == "slim"  # the last stage is what a plain build makes
    assert set(names) == {"venv-slim", "venv-full", "runtime", "full", "slim"}
    assert arguments("FROM", "slim") == ["runtime AS slim"]
    assert arguments("FROM", "full") == ["runtime AS full"]
    assert arguments("COPY", "slim") == ["--from=venv-slim /opt/venv /opt/venv"]
    assert arguments("COPY", "full") == ["--from=venv-full /opt/venv /opt/venv"]
    for stage in ("venv-slim", "runtime"):
        assert arguments("FROM", stage) == [f"${{BASE_IMAGE}} AS {stage}"]
    assert "ARG BASE_IMAGE=python:3.11-slim" in CONTAINERFILE.read_text()


def test_venvs_come_from_the_wheels_only_without_pip() -> None:
    (slim,) = arguments("RUN", "venv-slim")
    (full,) = arguments("RUN", "venv-full")
    assert arguments("COPY", "venv-slim") == ["wheels /wheels"]
    assert "the wheels are for ${PYTHON_VERSION}" in slim  # a base of another Python says so
    assert "python3 -m venv --without-pip /opt/venv" in slim
    for run, what in ((slim, "fl-coordinator"), (full, '"fl-coordinator[keras]"')):
        assert '"$1/pip" install --no-index --find-links /wheels --no-compile' in run
        assert f"--quiet {what} && " in run
        # Bytecode for what the commands import, by importing it.
        assert '/opt/venv/bin/python -c "import ${FL_IMPORTS}' in run
    (imports,) = [e for e in arguments("ENV", "venv-slim") if e.startswith("FL_IMPORTS=")]
    for module in ("app", "cli.health", "cli.watch", "storage.journal", "federation.selector_cli"):
        assert f"fl_coordinator.{module}" in imports


def test_runs_as_a_non_root_user() -> None:
    (user,) = arguments("USER")
    assert user == "10001:10001"
    (run,) = arguments("RUN", "runtime")
    assert "useradd --create-home --uid 10001 --gid 10001" in run
    assert "chown 10001:10001 /data" in run


def test_health_check_uses_the_health_command() -> None:
    (check,) = arguments("HEALTHCHECK")
    command = check[check.index("CMD") + 3 :].strip()
    assert command.startswith('["fl-coordinator", "health"')


def test_exposes_the_documented_ports_and_serves_data() -> None:
    variables = image_env()
    defaults = default_settings()
    ports = {int(p) for rest in arguments("EXPOSE") for p in rest.split()}
    assert int(variables["PORT"]) == defaults.port
    assert int(variables["STATUS_PORT"]) == defaults.status_port
    assert ports == {int(variables[k]) for k in ("PORT", "STATUS_PORT", "METRICS_PORT")}
    assert variables["HOST"] == "0.0.0.0"
    assert variables["PATH"].startswith("/opt/venv/bin:")
    assert arguments("VOLUME") == [variables["FL_ROOT_PATH"]] == ["/data"]
    assert [rest for word, rest in instructions() if word == "CMD"] == [
        '["fl-coordinator", "serve"]'
    ]
