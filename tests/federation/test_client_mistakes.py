"""Each failure of the reference ``fl-client`` is one line with an exit status (issue 13, item 6).

The real ``fl-client`` runs as a subprocess: against a port where nothing
listens, a coordinator's status port (HTTP/1, not gRPC), a real
``fl-selector serve`` that refuses it (its folder is not initialised), with a
data file that is not an ``.npz``, lacks ``y``, or does not fit the model.
A setting that cannot work exits with status 2, a peer that is not there
(or refuses for good) with 1; refusals and waiting are logged at INFO.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.processes import Served, environment

from fl_coordinator.config import Settings
from fl_coordinator.storage.layout import Layout

CLIENT = [sys.executable, "-m", "fl_coordinator.federation.client_cli"]
SELECTOR = [sys.executable, "-m", "fl_coordinator.federation.selector_cli", "serve"]
PORT_HINT = "(clients call a selector's port, fl-selector --port, 50051 by default)"


def client(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLIENT, *flags], capture_output=True, text=True, timeout=180, env=env)


def one_line(done: subprocess.CompletedProcess[str], status: int) -> str:
    """The client ended with ``status`` and its last line is its error (no traceback)."""
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr and "Exception Group" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    """Ten samples of the built-in model's input (64 features), labels 0 to 9."""
    path = tmp_path / "shard.npz"
    np.savez(path, x=np.zeros((10, 64), np.float32), y=np.arange(10))
    return path


def test_data_that_is_not_an_npz_or_lacks_y(tmp_path: Path) -> None:
    text = tmp_path / "shard.csv"
    text.write_text("1,2,3\n")
    assert one_line(client("--data", str(text)), 2) == (
        f"fl-client: configuration error: --data='{text}': expected an .npz file written by "
        "numpy.savez (this is not one: no zip header)"
    )
    only_x = tmp_path / "only_x.npz"
    np.savez(only_x, x=np.zeros((3, 64)))
    assert one_line(client("--data", str(only_x)), 2) == (
        f"fl-client: configuration error: --data='{only_x}': expected arrays named x and y "
        "(it has: x)"
    )
    floats = tmp_path / "float_labels.npz"
    np.savez(floats, x=np.zeros((3, 64)), y=np.zeros(3))
    assert one_line(client("--data", str(floats)), 2) == (
        f"fl-client: configuration error: --data='{floats}': expected integer class labels "
        "in y (y is float64)"
    )


def test_data_of_the_wrong_shape_is_refused_before_check_in(
    settings: Settings, layout: Layout, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 8, 8), np.float32), y=np.arange(4))
    port = closed_port()  # never dialled: the data is checked first
    done = client("--selector", f"127.0.0.1:{port}", "--data", str(wrong),
                  "--model", str(layout.model))  # fmt: skip
    assert one_line(done, 2) == (
        f"fl-client: configuration error: --data='{wrong}': expected samples of shape (64) in "
        f"x, as the model takes (x: (8, 8)) (model: {layout.model})"
    )
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((2, 64), np.float32), y=np.array([3, 12]))
    done = client("--selector", f"127.0.0.1:{port}", "--data", str(labels),
                  "--model", str(layout.model))  # fmt: skip
    assert one_line(done, 2).endswith(
        f"expected labels 0 to 9 in y (y: 3 to 12) (model: {layout.model})"
    )


def test_nothing_listening_names_the_address(shard: Path) -> None:
    port = closed_port()
    done = client("--selector", f"127.0.0.1:{port}", "--data", str(shard))
    assert one_line(done, 1) == (
        f"fl-client: nothing listens at 127.0.0.1:{port} (connection refused): is the "
        f"selector up? {PORT_HINT}"
    )


def test_a_port_that_is_not_grpc(settings: Settings, layout: Layout, shard: Path) -> None:
    with Served(environment(layout.root)) as coordinator:
        _, status_url = coordinator.ready()
        status = status_url.rsplit(":", 1)[1].split("/")[0]
        done = client("--selector", f"127.0.0.1:{status}", "--data", str(shard))
    assert one_line(done, 2) == (
        f"fl-client: the selector at 127.0.0.1:{status} answered in HTTP/1 (HTTP/1.1 405 ), "
        f"not gRPC: is that its gRPC port? {PORT_HINT}"
    )


def test_refusals_are_logged_then_it_gives_up(tmp_path: Path, shard: Path) -> None:
    """A selector whose folder is not initialised tells clients to come back: said at INFO."""
    coordinator = f"127.0.0.1:{closed_port()}"  # not there: the selector goes on, and warns
    flags = ["--coordinator", coordinator, "--root", str(tmp_path), "--port", "0"]
    selector = Served(environment(tmp_path), [*SELECTOR, *flags, "--waiting-time-ms", "100"])
    with selector:
        selector_id = selector.wait_for_line("serving").split("selector ")[1].split()[0]
        done = client("--selector", selector_id, "--data", str(shard), "--max-refusals", "2")
    assert one_line(done, 1) == f"fl-client: refused 3 times by {selector_id}"
    refusals = [line for line in done.stderr.splitlines() if "refused by" in line]
    assert len(refusals) == 3
    assert all(" INFO " in line for line in refusals), refusals
    assert f"refused by {selector_id} (1 of at most 3): checking in again in 0.1 s" in refusals[0]
