"""``fl-client`` as a person runs it: what it says when something outside it is wrong."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import numpy as np
import pytest

from fl_coordinator.federation import client_cli


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_selector_that_cannot_be_reached_is_one_line_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to end with a 40-line exception group ("All connection attempts failed")."""
    data = tmp_path / "shard.npz"
    np.savez(data, x=np.zeros((4, 64), "float32"), y=np.zeros(4, "int64"))
    selector = f"127.0.0.1:{closed_port()}"
    with caplog.at_level(logging.ERROR):
        status = client_cli.main(["--selector", selector, "--data", str(data), "--rounds", "1"])
    assert status == 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith(f"selector {selector} cannot be reached: ")
    assert "Traceback" not in capsys.readouterr().err
