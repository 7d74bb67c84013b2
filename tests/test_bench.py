"""scripts/bench --quick runs, so the benchmark never rots (its figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def test_bench_quick_writes_its_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "bench-aggregation.json").read_text())["aggregation"]
    assert [row["k"] for row in rows] == [2, 4]
    for row in rows:
        assert row["ours_s"] > 0 and row["bound_s"] > 0 and row["naive_s"] > 0
        assert row["ours_peak_mb"] >= 0 and row["largest_array_mb"] == 16
    assert "ours/bound" in result.stdout
