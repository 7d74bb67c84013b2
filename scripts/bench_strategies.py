"""Strategies part of scripts/bench: the server strategies side by side on a real federation.

For each seed and each strategy, ``fl-coordinator demo`` runs a whole
federation on this machine (the coordinator, 2 selectors and 6 clients as
processes over gRPC) on scikit-learn's digits split over the clients with
Dirichlet(0.1) label proportions (more skewed than the demo's 0.5), with
the strategy's documented defaults (``--strategy``, nothing else changed).
Every run starts from the same initial weights (the built-in model) with the
same client settings (the demo's: 2 local epochs of SGD, lr 0.05, momentum
0.9, batch 16); the seed draws the split and the held-out test set, the same
for every strategy. The coordinator evaluates each round's checkpoint on the
test set (``EVALUATE``, the demo's function) and ends the run after the last
round (``ROUNDS``). Runs are interleaved (seed by seed, every strategy), so
a change in the machine's load touches all of them alike.

What is reported per strategy: the round at which test accuracy first
reaches 0.90 (per seed; "-" if it never does within the rounds), and the
accuracy after the last round (mean and range over seeds). The plot shows
accuracy per round, one line per strategy (mean over seeds, the band their
range), and the centralized baseline the demo trains on the pooled data.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: The strategies compared, with their documented defaults.
STRATEGIES_COMPARED = ["fedavg", "fedavgm", "fedadam", "fedyogi"]

TARGET = 0.90
ALPHA = 0.1
CLIENTS = 6
SELECTORS = 2


def run_federation(strategy: str, seed: int, rounds: int, clients: int, root: Path) -> dict:
    """One demo run; its summary (per-round accuracy, the centralized baseline)."""
    result = subprocess.run(
        [sys.executable, "-m", "fl_coordinator", "demo", "--root", str(root),
         "--rounds", str(rounds), "--clients", str(clients), "--selectors", str(SELECTORS),
         "--alpha", str(ALPHA), "--seed", str(seed), "--strategy", strategy],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"demo {strategy} seed {seed} failed:\n{result.stderr[-3000:]}")
    return json.loads((root / "summary.json").read_text())


def first_round_at(accuracies: list[float | None], target: float) -> int | None:
    """The first round (from 1) whose accuracy reaches ``target``."""
    for number, accuracy in enumerate(accuracies, start=1):
        if accuracy is not None and accuracy >= target:
            return number
    return None


def bench_strategies(
    strategies: list[str], seeds: list[int], rounds: int, out: Path, quick: bool = False
) -> dict[str, Any]:
    clients = 2 if quick else CLIENTS
    runs: dict[str, dict[int, dict]] = {strategy: {} for strategy in strategies}
    with tempfile.TemporaryDirectory(prefix="fl-bench-strategies-") as name:
        for seed in seeds:
            for strategy in strategies:
                summary = run_federation(strategy, seed, rounds, clients, Path(name) / "demo")
                accuracies = [r["accuracy"] for r in summary["rounds"]]
                runs[strategy][seed] = {
                    "accuracy": accuracies,
                    "initial": summary["initial_accuracy"],
                    "centralized": summary["baseline"]["per_round"],
                    "seconds": summary["federation_seconds"],
                }
                reached = first_round_at(accuracies, TARGET)
                print(f"{strategy:>10} seed {seed}: final {accuracies[-1]:.3f}, "
                      f"{TARGET} at round {reached or '-'}", flush=True)  # fmt: skip
    rows = []
    for strategy in strategies:
        finals = [runs[strategy][seed]["accuracy"][-1] for seed in seeds]
        reached = [first_round_at(runs[strategy][seed]["accuracy"], TARGET) for seed in seeds]
        rows.append({
            "strategy": strategy,
            "rounds_to_target": reached,
            "final_mean": sum(finals) / len(finals),
            "final_min": min(finals),
            "final_max": max(finals),
        })  # fmt: skip
    centralized = [runs[strategies[0]][seed]["centralized"][-1] for seed in seeds]
    result = {
        "target": TARGET,
        "alpha": ALPHA,
        "clients": clients,
        "rounds": rounds,
        "seeds": seeds,
        "rows": rows,
        "centralized_final_mean": sum(centralized) / len(centralized),
        "runs": runs,
    }
    plot(result, out / "strategies.png")
    return result


def plot(result: dict[str, Any], dest: Path) -> None:
    """Accuracy per round: one line per strategy (mean over seeds, band: their range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4))
    seeds = result["seeds"]
    for strategy, by_seed in result["runs"].items():
        curves = [[by_seed[seed]["initial"], *by_seed[seed]["accuracy"]] for seed in seeds]
        rounds = range(len(curves[0]))
        columns = [[c[r] for c in curves if c[r] is not None] for r in rounds]
        kept = [r for r in rounds if columns[r]]
        mean = [sum(columns[r]) / len(columns[r]) for r in kept]
        line = axes.plot(kept, mean, "o-", markersize=3, label=strategy)[0]
        low, high = [min(columns[r]) for r in kept], [max(columns[r]) for r in kept]
        axes.fill_between(kept, low, high, color=line.get_color(), alpha=0.15)
    first = next(iter(result["runs"].values()))
    centralized = [
        sum(first[seed]["centralized"][r] for seed in seeds) / len(seeds)
        for r in range(result["rounds"])
    ]
    axes.plot(range(1, result["rounds"] + 1), centralized, "k--", linewidth=1,
              label="centralized (same epochs)")  # fmt: skip
    axes.axhline(result["target"], color="grey", linewidth=0.5)
    axes.set_xlabel("round")
    axes.set_ylabel("test accuracy")
    axes.set_title(
        f"digits, {result['clients']} clients, Dirichlet({result['alpha']}): "
        f"mean and range over {len(seeds)} seed(s)"
    )
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(dest, dpi=90)
    plt.close(figure)
