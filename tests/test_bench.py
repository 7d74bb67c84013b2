"""scripts/bench --quick runs, so the benchmark never rots (its figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

BENCH = REPO / "scripts" / "bench.py"


def _assert_paired(row: dict, references: dict) -> None:
    """``row``'s ratios to the references of its case (``references``: that case's row)."""
    for reference in ("raw", "sum"):  # one pair with --quick: min = median = max
        ratio = row[f"ratio_to_{reference}"]
        assert row[f"ratio_to_{reference}_min"] == ratio == row[f"ratio_to_{reference}_max"]
        assert ratio == pytest.approx(references[f"{reference}_s"] / row["ours_s"])


def test_bench_quick_writes_its_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "bench.json").read_text())
    rows = results["aggregation"]
    assert [row["k"] for row in rows] == [2, 4]
    for row in rows:
        assert row["ours_s"] > 0 and row["raw_s"] > 0 and row["sum_s"] > 0 and row["naive_s"] > 0
        assert row["ours_peak_mb"] >= 0 and row["largest_array_mb"] == 16
        _assert_paired(row, row)
    # Each strategy with an optimizer state, at the strategy case (16 MB, K=2 with --quick),
    # paired with that case's references.
    by_strategy = results["aggregation_strategies"]
    # FedAvg with differential privacy's noise (dp): the same pass, the same memory bound.
    assert [r["strategy"] for r in by_strategy] == [
        "fedavgm", "fedadagrad", "fedadam", "fedyogi", "dp",
    ]  # fmt: skip
    for row in by_strategy:
        assert (row["size_mb"], row["k"], row["largest_array_mb"]) == (16, 2, 16)
        assert row["ours_s"] > 0 and row["ours_peak_mb"] >= 0
        _assert_paired(row, rows[0])
    assert [(r["subscribers"], r["stalled"]) for r in results["fanout"]] == [(50, 0), (50, 10)]
    assert all(r["to_last_p99_ms"] >= r["to_last_p50_ms"] > 0 for r in results["fanout"])
    assert all(r["server_cpu_us_per_subscriber_message"] > 0 for r in results["fanout"])
    checkin = results["checkin"]
    assert [r["callers"] for r in checkin["per_client"]] == [1, 16]
    for row in checkin["per_client"]:
        for server in ("bare", "ours"):
            assert row[server]["calls_per_s"] > 0
            assert row[server]["p99_ms"] >= row[server]["p50_ms"] > 0
    # Per-client RPC: one client per accepted call; batched: up to --batch per call.
    for kind, per_call in (("per_client", 1), ("batched", 100)):
        for row in checkin[kind]:
            expected = per_call * row["ours"]["calls_per_s"]
            assert row["ours"]["clients_per_s"] == pytest.approx(expected)

    [round_row] = results["round"]
    assert (round_row["selectors"], round_row["rounds"], round_row["pairs"]) == (10, 5, 1)
    assert round_row["ours_rounds_per_s"] > 0 and round_row["reference_rounds_per_s"] > 0
    assert round_row["ratio_min"] == round_row["ratio_to_reference"] == round_row["ratio_max"]
    assert (round_row["without"], round_row["stubbed_calls"]) == ([], {})
    for title in (
        "raw/ours min/med/max",
        "to last p50 ms",
        "ours/bare",
        "batched",
        "ours/reference",
    ):
        assert title in result.stdout
    # The same figures as Markdown tables, for the README.
    report = (tmp_path / "bench.md").read_text()
    assert f"| fedyogi | 16 | 2 | {by_strategy[3]['ours_mb_per_s']:.0f} |" in report
    assert report.startswith("`./scripts/bench --quick --out ")
    assert f"/ **{rows[0]['ratio_to_raw']:.2f}** /" in report
    assert f"**{checkin['per_client'][1]['ratio_to_bare']:.2f}**" in report


def test_bench_round_without_stubs_each_duty_it_names(tmp_path: Path) -> None:
    """The what-if rows: each stub stood in for its duty in every round (5 timed, 1 not),
    and the output says that these rows are not what the coordinator does."""
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--parts", "round", "--out", str(tmp_path),
         "--round-without", "checks", "averaging", "journal"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    [row] = json.loads((tmp_path / "bench.json").read_text())["round"]
    assert row["without"] == ["checks", "averaging", "journal"]
    calls = row["stubbed_calls"]
    # 10 selectors' files each round; one averaging; an entry per stage change (5 a round)
    assert (calls["checks"], calls["averaging"]) == (10 * 6, 6)
    assert calls["journal"] >= 5 * 6
    assert row["ours_rounds_per_s"] > 0 and row["reference_rounds_per_s"] > 0
    said = "What-if: ours with its checks, averaging, journal stubbed (not what the coordinator"
    assert said in result.stdout
    assert said in (tmp_path / "bench.md").read_text()


def test_bench_round_checks_stub_waits_for_a_freshly_written_aggregate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An aggregate written less than SETTLE_SECONDS before its check (the bench's case with
    one selector: ``--selectors 1 --round-without checks`` failed about one run in two,
    red-team rt28): the checks stub hands on what the real checker found once it settled,
    a Contribution. Before: the stub cached NotSettled and handed it on as the selector's
    contribution (AttributeError: 'NotSettled' object has no attribute 'square_norm')."""
    import h5py
    import trio

    monkeypatch.syspath_prepend(str(BENCH.parent))
    from bench_round import stubbed, tiny_problem, write_aggregate

    from fl_coordinator.config import default_settings
    from fl_coordinator.storage.checker import ContributionChecker
    from fl_coordinator.storage.contribution import CheckpointSpec, Contribution
    from fl_coordinator.storage.weights import read_plan

    layout = tiny_problem(default_settings().replace(fl_root_path=str(tmp_path)))
    with h5py.File(layout.checkpoint, "r") as file:
        plan = read_plan(file, layout.checkpoint)
    checks = ContributionChecker(layout, CheckpointSpec(plan, layout.checkpoint.stat().st_size),
                                 10.0, 1)  # fmt: skip

    async def check_fresh() -> object:
        async with checks.running():
            write_aggregate(layout, "127.0.0.1:1")
            return await checks.check("127.0.0.1:1")

    with stubbed(["checks"]) as stubs:
        outcome = trio.run(check_fresh)
    assert isinstance(outcome, Contribution), outcome
    assert stubs.calls["checks"] == 1
