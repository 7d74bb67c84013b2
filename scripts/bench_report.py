"""The benchmark's figures as Markdown tables (``bench.md``), pasted as is into the README,
and the percentile every part reports.

Every figure is printed next to the reference it is compared with, measured
in the same run.
"""

from __future__ import annotations

from typing import Any

GO_CALLS_PER_S = {1: 2100, 16: 4300}  # the older Go coordinator on this machine (issue 5)


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` percentile of ``values`` (nearest rank), as the tables report it."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def aggregation(rows: list[dict[str, Any]]) -> str:
    naive = all("naive_s" in row for row in rows)
    header = ["model MB", "K", "largest array MB", "ours MB/s", "raw read MB/s",
              "raw read / ours (min / **median** / max)",
              "float64 sum / ours (min / **median** / max)", "ours peak MB"]  # fmt: skip
    header += ["vs naive", "naive peak MB"] if naive else []
    table = []
    for row in rows:
        cells = [f"{row['size_mb']:.0f}", str(row["k"]), f"{row['largest_array_mb']:.0f}",
                 f"{row['ours_mb_per_s']:.0f}", f"{row['raw_mb_per_s']:.0f}",
                 _spread(row, "raw"), _spread(row, "sum"),
                 f"{row['ours_peak_mb']:.0f}"]  # fmt: skip
        if naive:
            cells += [f"{row['speedup_over_naive']:.1f}x", f"{row['naive_peak_mb']:.0f}"]
        table.append(cells)
    return _table(header, table)


def _spread(row: dict[str, Any], reference: str) -> str:
    key = f"ratio_to_{reference}"
    return f"{row[key + '_min']:.2f} / **{row[key]:.2f}** / {row[key + '_max']:.2f}"


def _latency(figures: dict[str, Any]) -> str:
    return f"{figures['p50_ms']:.1f} / {figures['p99_ms']:.1f}"


def _go(row: dict[str, Any]) -> str:
    return str(GO_CALLS_PER_S.get(row["callers"], "-"))


def checkin(result: dict[str, Any]) -> str:
    header = ["callers", "bare purerpc calls/s", "ours calls/s", "ours / bare",
              "bare p50 / p99 ms", "ours p50 / p99 ms", "Go (issue 5) calls/s"]  # fmt: skip
    rows = [
        [str(row["callers"]), f"{row['bare']['calls_per_s']:.0f}",
         f"{row['ours']['calls_per_s']:.0f}", f"**{row['ratio_to_bare']:.2f}**",
         _latency(row["bare"]), _latency(row["ours"]), _go(row)]
        for row in result["per_client"]
    ]  # fmt: skip
    batched_header = ["callers", "clients per call", "per-client RPC clients/s",
                      "batched clients/s", "speed-up", "batched p50 / p99 ms",
                      "Go (issue 5) clients/s"]  # fmt: skip
    single = {row["callers"]: row["ours"]["clients_per_s"] for row in result["per_client"]}
    batched = [
        [str(row["callers"]), str(row["batch"]), f"{single[row['callers']]:.0f}",
         f"{row['ours']['clients_per_s']:.0f}", f"**{row['speedup']:.0f}x**",
         _latency(row["ours"]), _go(row)]
        for row in result["batched"]
    ]  # fmt: skip
    return _table(header, rows) + "\n\n" + _table(batched_header, batched)


def fanout(rows: list[dict[str, Any]]) -> str:
    header = ["subscribers", "stalled", "to last p50 ms", "to last p99 ms", "each p50 ms",
              "each p99 ms", "server CPU µs per subscriber per message"]  # fmt: skip
    keys = ["to_last_p50_ms", "to_last_p99_ms", "each_p50_ms", "each_p99_ms"]
    table = [
        [str(row["subscribers"]), str(row["stalled"])]
        + [f"{row[key]:.0f}" for key in keys]
        + [f"{row['server_cpu_us_per_subscriber_message']:.1f}"]
        for row in rows
    ]
    return _table(header, table)


#: The coordinator's storage duties the round part can stub (``--round-without``; see
#: bench_round.stubbed), for a what-if.
DUTIES = ("checks", "averaging", "journal")


def what_if(without: list[str]) -> str:
    """The line that marks round rows measured with ``without`` stubbed: not what we do."""
    return f"What-if: ours with its {', '.join(without)} stubbed (not what the coordinator does)."


def round_overhead(rows: list[dict[str, Any]]) -> str:
    header = ["selectors", "rounds", "reference rounds/s", "ours rounds/s",
              "ours / reference (min / **median** / max)",
              "ours: extra ms per selector"]  # fmt: skip
    table = _table(header, [_round_row(row) for row in rows])
    without = rows[0].get("without") if rows else None
    return f"{what_if(without)}\n\n{table}" if without else table


def _round_row(row: dict[str, Any]) -> list[str]:
    ratios = (
        f"{row['ratio_min']:.2f} / **{row['ratio_to_reference']:.2f}** / {row['ratio_max']:.2f}"
    )
    return [str(row["selectors"]), str(row["rounds"]),
            f"{row['reference_rounds_per_s']:.1f}", f"{row['ours_rounds_per_s']:.1f}",
            ratios, f"{row['extra_ms_per_selector']:.2f}"]  # fmt: skip


def aggregation_strategies(rows: list[dict[str, Any]]) -> str:
    header = ["strategy", "model MB", "K", "ours MB/s",
              "raw read / ours (min / **median** / max)",
              "float64 sum / ours (min / **median** / max)", "ours peak MB"]  # fmt: skip
    table = [
        [row["strategy"], f"{row['size_mb']:.0f}", str(row["k"]), f"{row['ours_mb_per_s']:.0f}",
         _spread(row, "raw"), _spread(row, "sum"), f"{row['ours_peak_mb']:.0f}"]
        for row in rows
    ]  # fmt: skip
    return _table(header, table)


def strategies(result: dict[str, Any]) -> str:
    target = result["target"]
    header = ["strategy", f"round reaching {target:.2f} (per seed)",
              f"accuracy after {result['rounds']} rounds: mean", "min", "max"]  # fmt: skip
    table = [
        [row["strategy"],
         ", ".join(str(r) if r is not None else "-" for r in row["rounds_to_target"]),
         f"**{row['final_mean']:.3f}**", f"{row['final_min']:.3f}", f"{row['final_max']:.3f}"]
        for row in result["rows"]
    ]  # fmt: skip
    centralized = f"{result['centralized_final_mean']:.3f}"
    table.append(["centralized (pooled data)", "", centralized, "", ""])
    return _table(header, table)


PARTS = {"aggregation": aggregation, "aggregation_strategies": aggregation_strategies,
         "checkin": checkin, "fanout": fanout, "round": round_overhead,
         "strategies": strategies}  # fmt: skip


def markdown(results: dict[str, Any], command: str) -> str:
    sections = [f"`{command}`"]
    for name, render in PARTS.items():
        if name in results:
            sections.append(f"**{name}**\n\n{render(results[name])}")
    return "\n\n".join(sections) + "\n"
