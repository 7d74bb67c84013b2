"""``fl-coordinator demo`` as a user runs it (smoke size: one round, two clients)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from helpers.processes import COMMAND, Served, environment
from storage.test_disk_full import _mounted

from fl_coordinator.config import default_settings
from fl_coordinator.federation.demo import DEMO_MARKER, _fresh_root
from fl_coordinator.storage.layout import Layout


def test_demo_smoke_run(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "fl_coordinator", "demo", "--rounds", "1", "--clients", "2",
         "--root", str(root)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((root / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1]
    assert 0.0 < summary["final_accuracy"] <= 1.0
    assert summary["final_accuracy"] != summary["initial_accuracy"]  # the round trained
    assert 0.0 < summary["baseline"]["accuracy"] <= 1.0
    assert len(summary["client_label_counts"]) == 2
    assert (root / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert h5py.is_hdf5(root / "initFiles" / "fl_checkpoint")
    assert h5py.is_hdf5(root / "initFiles" / "model.h5")
    assert "COMPLETED" in result.stdout and "centralized" in result.stdout
    assert (root / DEMO_MARKER).is_file()  # what lets the next demo empty this folder
    # Running it again replaces the previous demo; a folder of something else is refused.
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    refused = subprocess.run(
        [sys.executable, "-m", "fl_coordinator", "demo", "--root", str(other)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "not a previous demo" in refused.stderr
    assert (other / "thesis.tex").read_text() == "keep me"


def test_plot_has_whole_round_ticks() -> None:
    """One or two rounds used to get ticks at 0.25, 0.5, ... (issue 13, item 10)."""
    import matplotlib.pyplot as plt

    from fl_coordinator.federation.demo import accuracy_figure

    summary = {
        "initial_accuracy": 0.1,
        "rounds": [{"round": 1, "accuracy": 0.5}],
        "baseline": {"per_round": [0.6]},
        "settings": {"strategy": "fedavg"},
    }
    figure = accuracy_figure(summary)
    try:
        figure.canvas.draw()
        ticks = [t for t in figure.axes[0].get_xticks() if -0.5 <= t <= 1.5]
        assert ticks == [0.0, 1.0]
    finally:
        plt.close(figure)


def test_demo_with_differential_privacy(tmp_path: Path) -> None:
    """Real clients clip, real selectors check, the coordinator adds noise and accounts."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    root = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "fl_coordinator", "demo", "--rounds", "1", "--clients", "2",
         "--root", str(root), "--dp", "1.5", "--clip-norm", "0.5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((root / "summary.json").read_text())
    accountant = RdpAccountant()  # 2 of 2 clients each round: q = 1
    accountant.compose(dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(1.5)))
    expected = accountant.get_epsilon(1e-5)
    assert summary["privacy"] == {
        "noise_multiplier": 1.5, "clip_norm": 0.5, "population": 2, "sampling_rate": 1.0,
        "delta": 1e-5, "epsilon": expected,
    }  # fmt: skip
    assert f"epsilon {expected:.4g} at delta=1e-05" in result.stdout
    # Every client's clipped upload passed its selector's check (none refused).
    selector_logs = "".join(p.read_text() for p in (root / "logs").glob("selector*.log"))
    assert "aggregated 1 upload(s), total weight 1" in selector_logs
    assert "refused" not in selector_logs


def _demo(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, "demo", "--rounds", "1", "--clients", "2", "--root", str(root)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("demo_like", [[], ["summary.json"], ["clients/client0.npz"]])
def test_a_problem_folder_is_never_emptied(tmp_path: Path, demo_like: list[str]) -> None:
    """`demo --root` emptied any folder holding initFiles/ (every problem folder does: the
    trained checkpoint, its history, the selectors' folders went), or summary.json, or
    clients/. Only a folder the demo marked as its own is emptied."""
    root = tmp_path / "digits"
    files = {
        "initFiles/fl_checkpoint": b"trained weights",
        "initFiles/model.h5": b"model",
        ".coordinator/journal.json": b"{}",
        "10.0.0.5:50051/fl_agg_checkpoint": b"a selector's aggregate",
        **{name: b"the user's" for name in demo_like},
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    refused = _demo(root)
    assert refused.returncode == 1
    assert refused.stderr == (
        f"fl-coordinator demo: --root {root} is not empty and not a previous demo (it has no "
        f"{DEMO_MARKER}); choose another, or remove it if it is an older demo's\n"
    )
    assert _files(root) == files


def test_a_demo_folder_served_by_a_coordinator_is_not_emptied(
    tmp_path: Path, settings, layout
) -> None:
    """The README suggests trying the roles on the demo's folder: a coordinator serving it
    is not pulled from under its feet by the next demo."""
    root = Path(settings.fl_root_path)
    (root / DEMO_MARKER).write_text("made by fl-coordinator demo\n")
    before = _files(root)
    with Served(environment(root)) as served:
        served.ready()
        refused = _demo(root)
        served.process.terminate()
        served.process.wait(timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"fl-coordinator demo: demo refused: {root} is served by ")
    assert {name: data for name, data in _files(root).items() if name in before} == before


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--epochs", "0"], "--epochs 0"),  # these four stalled until the demo gave up
        (["--batch-size", "0"], "--batch-size 0"),
        (["--learning-rate", "nan"], "--learning-rate nan"),
        (["--alpha", "0"], "--alpha 0"),
        (["--alpha", "-1", "--momentum", "1"], "--momentum 1, --alpha -1"),  # a traceback
    ],
)
def test_training_flags_that_cannot_train_are_one_line(
    tmp_path: Path, flags: list[str], named: str
) -> None:
    result = subprocess.run(
        [*COMMAND, "demo", "--root", str(tmp_path / "demo"), *flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        f"fl-coordinator demo: {named}: need epochs >= 1, batch size >= 1, a learning rate > 0, "
        "a momentum in [0, 1) and an alpha > 0\n"
    )
    assert not (tmp_path / "demo").exists()


def test_a_root_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """It was a FileNotFoundError traceback."""
    (tmp_path / "file").write_text("")
    root = tmp_path / "file" / "demo"
    result = subprocess.run(
        [*COMMAND, "demo", "--root", str(root)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"fl-coordinator demo: --root {root}: cannot make this folder (Not a directory)\n"
    )


def test_a_mount_point_is_emptied_and_kept(tmp_path: Path) -> None:
    """``--root`` a volume's mount point (a tmpfs here): empty, or a previous demo's. It is
    emptied, kept, and holds only logs/ and the marker after. Before: OSError EBUSY, a
    traceback, as the demo removed the folder itself."""
    root = tmp_path / "volume"
    with _mounted(root, "-t", "tmpfs", "-o", "size=1m", "tmpfs"):
        layout = Layout.from_settings(default_settings().replace(fl_root_path=str(root)))
        _fresh_root(layout)  # empty
        (root / "summary.json").write_text("{}")  # what a demo leaves
        (root / "clients").mkdir()
        (root / "clients" / "client0.npz").write_bytes(b"shard")
        _fresh_root(layout)  # a previous demo's
        assert sorted(p.name for p in root.iterdir()) == [DEMO_MARKER, "logs"]
        assert list((root / "logs").iterdir()) == []
        assert os.path.ismount(root)
