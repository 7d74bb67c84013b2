"""``fl-coordinator`` as an operator runs it: real processes, real signals, real ports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers.processes import COMMAND, Served, environment, run, wait_until

from fl_coordinator.cli.exits import exit_status
from fl_coordinator.storage.model import builtin_model


@pytest.fixture
def served() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


@pytest.fixture
def root(settings) -> Path:
    return Path(settings.fl_root_path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_fresh_root_is_initialised_then_signal_stops_cleanly(
    tmp_path: Path, served: list[Served], signum: int
) -> None:
    root = tmp_path / "data"
    server = Served(environment(root), [*COMMAND, "serve", "--init-if-empty"])
    served.append(server)
    server.wait_for_line("status stream at")
    assert any("initialising it with the built-in model" in line for line in server.lines)
    assert (root / "initFiles" / "fl_checkpoint").is_file()
    assert (root / "initFiles" / "model.h5").is_file()
    server.process.send_signal(signum)
    # A hang fails here; how fast it stops is measured, not asserted (it failed at
    # 1.03 s under load on a 1.0 s limit; unloaded it takes 0.07 to 0.1 s).
    assert server.process.wait(timeout=10) == 0
    log = server.rest()
    assert "Traceback" not in log and "Got exception" not in log
    assert f"{signal.Signals(signum).name} received: shutting down" in log


@pytest.mark.parametrize(
    ("key", "value"),
    [("PORT", "abc"), ("CHECKIN_LIMIT", "0"), ("STATUS_PORT", "99999"), ("HOST", "")],
)
def test_bad_setting_is_one_line_and_status_2(root: Path, key: str, value: str) -> None:
    result = run(["serve"], environment(root, **{key: value}))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fl-coordinator serve: configuration error: {key}={value!r}")


@pytest.mark.parametrize(
    ("damage", "key"),
    [
        (lambda r: (r / "initFiles" / "model.h5").unlink(), "MODEL_FILE"),
        (lambda r: (r / "initFiles" / "fl_checkpoint").unlink(), "CHECKPOINT_FILE"),
        (
            lambda r: (r / "initFiles" / "fl_checkpoint").write_bytes(b"junk" * 64),
            "CHECKPOINT_FILE",
        ),
        (
            lambda r: (r / "initFiles" / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 99),
            "MODEL_FILE",
        ),
    ],
    ids=["no model", "no checkpoint", "corrupt checkpoint", "corrupt model"],
)
def test_incomplete_init_files_stop_startup(root: Path, damage, key: str) -> None:
    """The advice works: rollback restores only the checkpoint, init rewrites both files."""
    damage(root)
    result = run(["serve"], environment(root))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"configuration error: {key}=" in result.stderr
    if key == "CHECKPOINT_FILE":
        assert result.stderr.endswith(
            "`fl-coordinator rollback` lists the kept checkpoints and `rollback --round N` "
            "restores one; or start over from the model's initial weights with "
            f"`fl-coordinator init --force --model {root / 'initFiles' / 'model.h5'}`)\n"
        )
    else:
        assert result.stderr.endswith(
            "copy back the model it was initialised with (the file given to `init --model`; "
            "the built-in one: `fl-coordinator init --root SCRATCH` writes it to "
            "SCRATCH/initFiles/model.h5); `init --force` here would also replace the trained "
            "checkpoint, and rollback restores only the checkpoint)\n"
        )


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    result = run(["serve"], environment(tmp_path / "file"))
    assert result.returncode == 2
    assert result.stderr == (
        f"fl-coordinator serve: configuration error: FL_ROOT_PATH='{tmp_path / 'file'}': "
        "expected a folder (it is a file)\n"
    )


def test_missing_or_empty_root_is_refused_unless_asked(tmp_path: Path) -> None:
    """A typo or a mount that is not there is not started fresh: one line, nothing written."""
    typo = tmp_path / "problme"
    result = run(["serve"], environment(typo))
    assert (result.returncode, result.stderr) == (2, (
        f"fl-coordinator serve: configuration error: FL_ROOT_PATH='{typo}': expected an "
        "initialised problem folder (there is no such folder: a typo, or a mount that is not "
        f"there?); run `fl-coordinator init --root {typo}` once, or serve with --init-if-empty "
        "to initialise it with the built-in model\n"
    ))  # fmt: skip
    assert not typo.exists()
    empty = tmp_path / "mnt"
    empty.mkdir()
    result = run(["serve"], environment(empty))
    assert result.returncode == 2
    assert f"FL_ROOT_PATH='{empty}': expected an initialised problem folder (it has no " \
        "initFiles/); run `fl-coordinator init" in result.stderr  # fmt: skip
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("init", [[], ["--init-if-empty"]], ids=["serve", "--init-if-empty"])
def test_unusable_root_is_one_line(root: Path, tmp_path: Path, init: list[str]) -> None:
    """/proc/nope cannot be created; a folder of another user cannot be read (as uid 65534)."""
    result = run(["serve", *init], environment(Path("/proc/nope")))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    if init:  # after the line that says it initialises
        assert result.stderr.splitlines()[-1] == (
            "fl-coordinator serve: cannot write /proc/nope/initFiles ([Errno 2] No such file or "
            "directory); nothing was changed"
        )
    else:
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert "FL_ROOT_PATH='/proc/nope': expected an initialised problem folder" in result.stderr
    # root's, as a volume never handed to the coordinator's uid: the folder itself, and one
    # inside a folder that uid cannot even look into
    shared = Path(tempfile.mkdtemp(prefix="fl-root-"))
    try:
        shared.chmod(0o755)
        volume = shared / "volume"
        shutil.copytree(root, volume)
        volume.chmod(0o700)
        hidden = volume / "problem"
        hidden.mkdir()
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *COMMAND]
        for folder, expected in [
            (volume, "can read and write"),
            (hidden, "can read ([Errno 13] Permission denied)"),
        ]:
            as_nobody = subprocess.run([*nobody, "serve", *init], env=environment(folder),
                                       capture_output=True, text=True, timeout=120)  # fmt: skip
            assert (as_nobody.returncode, as_nobody.stderr) == (2, (
                f"fl-coordinator serve: configuration error: FL_ROOT_PATH='{folder}': expected "
                f"a folder this user (uid 65534) {expected}\n"
            ))  # fmt: skip
    finally:
        shutil.rmtree(shared)


@pytest.mark.parametrize("key", ["PORT", "STATUS_PORT"])
def test_port_already_taken_even_with_reuseport(root: Path, key: str) -> None:
    # The other listener sets SO_REUSEPORT, as purerpc's stock server does: if
    # we set it too, the kernel would let us share the port and split rounds.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = run(["serve"], environment(root, **{key: str(port)}))
    assert result.returncode == 2
    assert f"configuration error: {key}={port}: expected a free port" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("999.1.1.1", "a name that resolves to one (it does not: Name or service not known)"),
        ("example.invalid", "a name that resolves to one (it does not: Name or service not known)"),
        ("192.0.2.1", "0.0.0.0 for all of them (it is not one: Cannot assign requested address)"),
    ],
    ids=["not an address", "does not resolve", "not this machine's"],
)
def test_a_host_to_listen_at_that_is_not_ours_names_host(root: Path, host: str, why: str) -> None:
    """The address is the fault, not the port: the line names HOST (it named PORT=0)."""
    result = run(["serve"], environment(root, HOST=host))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (  # after the start-up's INFO lines
        f"fl-coordinator serve: configuration error: HOST={host!r}: expected an address of "
        f"this machine to listen at, or {why}"
    )
    assert not (root / ".coordinator" / "owner.json").exists()  # given up on the way out


def test_init_refuses_to_overwrite_then_force(root: Path) -> None:
    env = environment(root)
    result = run(["init"], env)
    assert result.returncode == 2
    assert "already exists; use --force" in result.stderr
    (root / "initFiles" / "fl_checkpoint").write_bytes(b"old")
    assert run(["init", "--force"], env).returncode == 0
    assert h5py.is_hdf5(root / "initFiles" / "fl_checkpoint")


def test_init_with_a_users_model(tmp_path: Path) -> None:
    source = tmp_path / "mine.h5"
    model = builtin_model(seed=42)
    model.save(source)
    target = tmp_path / "problem"
    result = run(["init", "--root", str(target), "--model", str(source)], environment(target))
    assert result.returncode == 0, result.stderr
    assert (target / "initFiles" / "model.h5").read_bytes() == source.read_bytes()
    with h5py.File(target / "initFiles" / "fl_checkpoint", "r") as file:
        np.testing.assert_array_equal(file["layers/dense/vars/0"][()], model.get_weights()[0])
    missing = run(
        ["init", "--root", str(tmp_path / "x"), "--model", "nope.h5"], environment(target)
    )
    assert missing.returncode == 2 and "--model='nope.h5'" in missing.stderr
    shutil.rmtree(target)


def test_one_coordinator_per_problem_folder(root: Path, served: list[Served]) -> None:
    """Issue 13: a second serve on the same root is refused with one line naming the holder,
    and so is a rollback; after a kill -9 on this host the next serve takes over, loudly."""
    env = environment(root)
    first = Served(env)
    served.append(first)
    first.wait_for_line("selectors at")

    second = run(["serve"], env)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"is served by {socket.gethostname()} pid {first.process.pid}" in lines[0]
    journal = root / ".coordinator" / "journal.json"  # the second ran no restart logic:
    assert not journal.exists() or json.loads(journal.read_text())["stage"] != "FAILED"

    rollback = run(["rollback", "--round", "0"], env)
    assert rollback.returncode == 2
    assert rollback.stderr.startswith("fl-coordinator rollback: rollback refused: ")

    first.process.kill()  # kill -9: its lease stays behind
    first.process.wait()
    assert (root / ".coordinator" / "owner.json").exists()
    third = Served(env)
    served.append(third)
    took = third.wait_for_line("took")
    assert f"pid {first.process.pid}" in took and "WARNING" in took
    third.wait_for_line("selectors at")
    third.process.send_signal(signal.SIGTERM)
    assert third.process.wait(timeout=60) == 0
    assert not (root / ".coordinator" / "owner.json").exists()  # a clean stop gives it up


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        ({"AUTH_TOKEN": "change-me"}, "AUTH_TOKEN='change-me'"),
        ({"STATUS_TOKEN": "Change_Me"}, "STATUS_TOKEN='Change_Me'"),
        ({"AUTH_TOKEN_FILE": "{token_file}"}, "AUTH_TOKEN_FILE ({token_file})='changeme'"),
    ],
    ids=["AUTH_TOKEN", "STATUS_TOKEN", "AUTH_TOKEN_FILE"],
)
def test_placeholder_tokens_are_refused(
    root: Path, tmp_path: Path, env: dict[str, str], shown: str
) -> None:
    """The value of a shipped example is no secret: serve and fl-selector refuse it."""
    token_file = tmp_path / "token"
    token_file.write_text("changeme\n")
    env = {key: value.format(token_file=token_file) for key, value in env.items()}
    expected = (
        f"configuration error: {shown.format(token_file=token_file)}: expected a secret, not a "
        "well-known placeholder: make one with `openssl rand -hex 24`\n"
    )
    result = run(["serve"], environment(root, **env))
    assert (result.returncode, result.stderr) == (2, f"fl-coordinator serve: {expected}")
    if "STATUS_TOKEN" not in env:
        selector = subprocess.run(
            [*COMMAND[:2], "fl_coordinator.federation.selector_cli", "serve", "--port", "0"],
            env=environment(root, **env), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert (selector.returncode, selector.stderr) == (2, f"fl-selector: {expected}")


def test_start_line_says_where_it_listens_and_misspelt_variables_are_named(
    root: Path, tmp_path: Path, served: list[Served]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("CHECKIN_LIMIT: 2\nREPORTING_TIMEOT: 30\n")
    env = environment(root, HOST="0.0.0.0", CHECKIN_LIMT="6", LOG_LEVL="DEBUG")
    server = Served(env, [*COMMAND, "serve", "--config", str(config)])
    served.append(server)
    grpc_port, status_url = server.ready()
    status_port = int(status_url.rsplit(":", 1)[1].split("/")[0])
    started = server.lines[-1]
    assert (
        f"selectors at 0.0.0.0:{grpc_port} (FlIntra), status stream at "
        f"ws://0.0.0.0:{status_port}/status, metrics at "
    ) in started
    assert started.rstrip().endswith(
        f"(0.0.0.0: every address of this machine, e.g. {socket.gethostname()})"
    )
    warnings = [line for line in server.lines if " WARNING " in line]
    for name, key in [("CHECKIN_LIMT", "CHECKIN_LIMIT"), ("LOG_LEVL", "LOG_LEVEL")]:
        assert any(
            f"environment variable {name} is not a setting and is ignored; did you mean {key}?"
            in line
            for line in warnings
        ), warnings
    assert any(
        f"{config}: unknown key REPORTING_TIMEOT ignored (did you mean REPORTING_TIMEOUT?)" in line
        for line in warnings
    ), warnings
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0


def test_rollback_names_where_it_looked(root: Path, tmp_path: Path) -> None:
    """--root, and a listing that says which folder it read (issue 13, item 8)."""
    env = environment(tmp_path / "not-this-one")
    empty = run(["rollback", "--root", str(root)], env)
    assert (empty.returncode, empty.stdout) == (0, (
        f"no kept checkpoints in {root / '.coordinator' / 'history'} (is {root} the problem's "
        "folder? a coordinator keeps the last KEEP_CHECKPOINTS=5)\n"
    ))  # fmt: skip
    typo = tmp_path / "problme"
    missing = run(["rollback", "--root", str(typo)], env)
    assert (missing.returncode, missing.stderr) == (2, (
        f"fl-coordinator rollback: configuration error: --root='{typo}': expected an existing "
        "problem folder\n"
    ))  # fmt: skip


def _reading_stdin(pid: int) -> bool:
    """Whether ``pid`` is blocked in a read (x86-64 numbers it 0, arm64 63) of its stdin's pipe."""
    fields = Path(f"/proc/{pid}/syscall").read_text().split()
    if fields[0] not in ("0", "63"):
        return False
    try:
        return os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}") == os.readlink(
            f"/proc/{pid}/fd/0"
        )
    except OSError:  # that descriptor was closed meanwhile
        return False


#: A command started as a terminal starts it: SIGINT at its default action, which Python
#: turns into KeyboardInterrupt. (A shell's background job, as tests may be run, ignores
#: SIGINT, and a program started so keeps ignoring it.)
_AS_IN_A_TERMINAL = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


def test_ctrl_c_outside_the_event_loop_is_one_line_and_status_130(root: Path) -> None:
    """Ctrl-C while serve still reads its config (a pipe nobody writes): before trio's signal
    handling, as while Keras loads for init. It was a KeyboardInterrupt traceback."""
    process = subprocess.Popen(
        [*_AS_IN_A_TERMINAL, *COMMAND, "serve", "--config", "/dev/stdin"],
        env=environment(root),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: _reading_stdin(process.pid), limit=60)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr == "fl-coordinator serve: interrupted (Ctrl-C)\n"


#: What a console script runs (SCRIPT is "module:function", as pyproject.toml names it),
#: interrupted as the module LOADING is first imported: ``python -c ... LOADING SCRIPT ARGV...``.
#: Nothing of the package is imported before the hook is in place, as for the console script.
_CTRL_C_AS_IT_LOADS = """
import importlib, importlib.abc, signal, sys

_, loading, script, *sys.argv = sys.argv  # sys.argv as the console script has it
module, function = script.split(":")

class Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == loading:
            sys.meta_path.remove(self)
            signal.raise_signal(signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupt())
sys.exit(getattr(importlib.import_module(module), function)())
"""


def _interrupted_as_it_loads(
    root: Path, loading: str, script: str, argv: list[str]
) -> subprocess.CompletedProcess[str]:
    """The console script ``script`` run as ``argv`` (its name first), Ctrl-C'd as it first
    imports ``loading``."""
    return subprocess.run(
        [*_AS_IN_A_TERMINAL, sys.executable, "-c", _CTRL_C_AS_IT_LOADS, loading, script, *argv],
        env=environment(root), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("loading", "argv", "prog"),
    [
        # Before parsing: argparse's formatter, which parsing loads, at about 0.03 s.
        ("fl_coordinator.cli.help", ["serve"], "fl-coordinator"),
        # The settings, which `import fl_coordinator` loaded: from about 0.02 to 0.1 s.
        ("yaml", ["serve"], "fl-coordinator serve"),
        ("fl_coordinator.config", ["serve"], "fl-coordinator serve"),
        # What serve loads first, for 0.1 s.
        ("trio", ["serve"], "fl-coordinator serve"),
        # The demo's flags and its federation, about 0.4 s, before its own exit_status.
        ("fl_coordinator.federation.demo", ["demo"], "fl-coordinator demo"),
    ],
)
def test_ctrl_c_while_the_program_loads_is_one_line_and_status_130(
    root: Path, loading: str, argv: list[str], prog: str
) -> None:
    """Ctrl-C as ``fl-coordinator`` imports ``loading``: it was a KeyboardInterrupt traceback,
    status -2, for all but trio (the package and ``cli.main`` loaded the settings, the
    logging set-up and the help formatter, and the command line was parsed, outside
    exit_status; the demo's modules were loaded outside it as well)."""
    ran = _interrupted_as_it_loads(
        root, loading, "fl_coordinator.cli.main:entry", ["fl-coordinator", *argv]
    )
    assert (ran.returncode, ran.stderr) == (130, f"{prog}: interrupted (Ctrl-C)\n")


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("fl_coordinator.federation.selector_cli:main", ["fl-selector", "serve"]),
        ("fl_coordinator.federation.client_cli:main", ["fl-client", "--data", "x.npz"]),
    ],
)
def test_ctrl_c_while_a_federation_tool_loads_is_one_line(
    root: Path, script: str, argv: list[str]
) -> None:
    """fl-selector and fl-client imported trio, purerpc, numpy and h5py (about 0.5 s) at the
    top of the module their console script imports, outside exit_status: a Ctrl-C then
    was a KeyboardInterrupt traceback, status -2."""
    ran = _interrupted_as_it_loads(root, "trio", script, argv)
    assert (ran.returncode, ran.stderr) == (130, f"{argv[0]}: interrupted (Ctrl-C)\n")


_CTRL_C_IN_A_GC_CALLBACK = """
import gc, signal, sys
from fl_coordinator.cli.exits import exit_status

def job():
    def callback(phase, info):  # as JAX's _xla_gc_callback, where the handler then runs
        if phase == "start":
            gc.callbacks.remove(callback)
            signal.raise_signal(signal.SIGINT)
    gc.callbacks.append(callback)
    gc.collect()
    return 0

sys.exit(exit_status("prog", job))
"""


def test_ctrl_c_that_lands_in_a_gc_callback_still_interrupts() -> None:
    """SIGINT whose handler runs inside a garbage collector callback (JAX's, while Keras
    loads: ``init`` or the demo interrupted about 1.5 s in). Before: "Exception ignored
    in: <function _xla_gc_callback> ... KeyboardInterrupt" on stderr, and the command
    carried on: init finished with exit status 0, the demo ran its rounds."""
    ran = subprocess.run(
        [*_AS_IN_A_TERMINAL, sys.executable, "-c", _CTRL_C_IN_A_GC_CALLBACK],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (ran.returncode, ran.stderr) == (130, "prog: interrupted (Ctrl-C)\n")


def test_interrupts_in_a_group_are_one_line_other_errors_are_not_hidden(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def interrupted() -> int:
        raise BaseExceptionGroup("nursery", [KeyboardInterrupt(), KeyboardInterrupt()])

    assert exit_status("prog", interrupted) == 130
    assert capsys.readouterr().err == "prog: interrupted (Ctrl-C)\n"

    def failed() -> int:
        raise BaseExceptionGroup("nursery", [KeyboardInterrupt(), ValueError("a bug")])

    with pytest.raises(BaseExceptionGroup) as raised:
        exit_status("prog", failed)
    assert [type(e) for e in raised.value.exceptions] == [KeyboardInterrupt, ValueError]


def test_a_journal_edited_by_hand_stops_startup_with_the_key_at_fault(root: Path) -> None:
    """Not read leniently: ``"aggregating": "no"`` taken as true would have counted an
    abandoned round as completed. Nothing is started, the journal is left as it was."""
    journal = root / ".coordinator" / "journal.json"
    journal.parent.mkdir(parents=True, exist_ok=True)
    text = '{"round": 4, "stage": "REPORTING", "aggregating": "no"}'
    journal.write_text(text)
    result = run(["serve"], environment(root))
    assert (result.returncode, result.stderr.splitlines()[-1]) == (2, (
        f"fl-coordinator serve: {journal}: not a readable round journal (aggregating must be "
        "true or false, found a string); move it away to start counting rounds from the "
        "history"
    ))  # fmt: skip
    assert "Traceback" not in result.stderr
    assert journal.read_text() == text
