"""Benchmarks, measured side by side in one run (this machine is shared: ratios hold, times drift).

Parts: **aggregation** (here), **check-ins** (bench_checkin.py), **fan-out**
(bench_fanout.py), **round overhead** (bench_round.py) and, asked for by name
(``--parts strategies``, minutes), **strategies** (bench_strategies.py: the
server strategies side by side on a federation of the demo's digits).

Aggregation: for K selector aggregates of a Keras model of about S bytes it
times, each in a fresh process (so peak memory is that process's own):


* ``ours``: ``fl_coordinator.storage.aggregation.aggregate`` end to end (reads K+1
  files, writes the new checkpoint, atomically);
* ``raw``: the raw read of the same K+1 files (``os.readv`` into one buffer
  allocated and touched before the clock starts): what reading the bytes
  costs, whatever parses them;
* ``sum``: the float64 sum of the same K+1 models' arrays, already in memory
  (read and accumulators touched before the clock starts): what adding costs;
* ``naive``: what the older system did: load the Keras model weights per
  file and combine ``get_weights()`` lists layer by layer.

The runs are paired: each repetition runs every mode once, one after the
other, and the ratios ``raw/ours`` and ``sum/ours`` (times) of each
repetition are reported as min/median/max, with the median times.

At the largest case (``--strategy-case``), ``ours`` is also timed with each
server strategy that keeps an optimizer state (read and written in the same
pass), from a state written by an untimed first aggregation, in the same
pairs (the same raw and sum runs are its references), and with client-level
differential privacy (``dp``: FedAvg plus Gaussian noise drawn for every
coordinate, the same streaming pass; its peak memory beside ``ours``' shows
the bound holds with DP on).

Usage: ``scripts/bench [--quick] [--parts ...] [--cases 100x2 100x8 100x16
1000x2] [--repeat 3] [--out DIR]`` (``--help`` lists the rest; a case is
``S``x``K``, model MB x selector aggregates). Prints a table and writes
``DIR/bench.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_report import DUTIES, markdown, what_if
from bench_strategies import STRATEGIES_COMPARED

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

WIDTH = 2048  # Dense(2048) kernels: 16 MiB of float32 each


def build_model(size_mb: float) -> Any:
    from fl_coordinator.storage.model import import_keras

    keras = import_keras()
    layers = max(1, round(size_mb * 2**20 / (WIDTH * WIDTH * 4)))
    model = keras.Sequential(
        [keras.Input(shape=(WIDTH,))] + [keras.layers.Dense(WIDTH) for _ in range(layers)]
    )
    return model


def make_files(folder: Path, size_mb: float, k: int) -> list[Path]:
    """The global checkpoint and K aggregates: real Keras weights files, different values."""
    import numpy as np

    model = build_model(size_mb)
    paths = []
    for index in range(k + 1):
        model.set_weights([np.full(w.shape, 0.01 * (index + 1), np.float32)
                           for w in model.get_weights()])  # fmt: skip
        path = folder / ("fl_checkpoint" if index == 0 else f"agg{index}")
        model.save_weights(folder / "tmp.weights.h5")
        os.replace(folder / "tmp.weights.h5", path)
        (folder / f"weight{index}").write_text(f"{index + 3}\n")
        paths.append(path)
    return paths


def reset_peak_rss() -> None:
    """Linux: make the high-water mark (VmHWM) start again from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Resident memory now (Linux): the baseline the peak is measured against."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


# -- workers (each run in its own process) --------------------------------------------


def work_ours(folder: Path, k: int, strategy: str = "fedavg") -> Callable[[], None]:
    """Our aggregation; with a ``strategy`` that keeps a state, from ``state-prepared.h5``
    (made by an untimed first run) to ``state-new.h5``; with :data:`DP`, FedAvg with
    differential privacy's noise (z = 1, C = 1, the noise drawn from OS entropy)."""
    from fl_coordinator.core.privacy import DifferentialPrivacy
    from fl_coordinator.core.strategy import ServerOptimizer, Strategy
    from fl_coordinator.storage.aggregation import Contribution, ServerUpdate, aggregate
    from fl_coordinator.storage.strategy_state import StateUpdate
    from fl_coordinator.storage.untrusted import UntrustedFile

    weights = [int((folder / f"weight{i}").read_text()) for i in range(1, k + 1)]
    parts = [
        Contribution(f"s{i}", UntrustedFile(folder, f"agg{i}"), weight)
        for i, weight in enumerate(weights, start=1)
    ]
    if strategy == DP:
        privacy = DifferentialPrivacy(1.0, 1.0, denominator=k, population=1000)
        noised = ServerUpdate(Strategy(privacy=privacy))
        return lambda: aggregate(folder / "fl_checkpoint", parts, folder / "tmp", None, noised)
    optimizer = ServerOptimizer.of(strategy)
    prepared = folder / "state-prepared.h5"
    state = None
    if optimizer.moments:
        source = prepared if prepared.exists() else None
        dest = folder / ("state-new.h5" if source else "state-prepared.h5")
        state = StateUpdate(optimizer, source, dest, 1)
    update = ServerUpdate(Strategy(optimizer), state)
    return lambda: aggregate(folder / "fl_checkpoint", parts, folder / "tmp", None, update)


def _inputs(folder: Path, k: int) -> list[Path]:
    return [folder / "fl_checkpoint"] + [folder / f"agg{i}" for i in range(1, k + 1)]


def work_raw(folder: Path, k: int) -> Callable[[], None]:
    """Read the K+1 files' bytes into one reused buffer, touched beforehand."""
    paths = _inputs(folder, k)
    buffer = bytearray(max(path.stat().st_size for path in paths))
    view = memoryview(buffer)  # bytearray(n) is zeroed: every page is touched

    def run() -> None:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                while os.readv(fd, [view]) == len(view):
                    pass
            finally:
                os.close(fd)

    return run


def work_sum(folder: Path, k: int) -> Callable[[], None]:
    """Add the K+1 models' arrays, read beforehand, into float64 accumulators."""
    import h5py
    import numpy as np

    paths = _inputs(folder, k)
    with h5py.File(paths[0], "r") as file:
        names = _floats(file)
        totals = {n: np.zeros(file[n].shape, np.float64) for n in names}
    models = []
    for path in paths:
        with h5py.File(path, "r") as file:
            models.append({name: file[name][()] for name in names})
    for total in totals.values():
        total.fill(1.0)  # touched: no page fault inside the clock

    def run() -> None:
        for name, total in totals.items():
            np.add(models[0][name], models[1][name], out=total, dtype=np.float64)
            for model in models[2:]:
                total += model[name]

    return run


def work_naive(folder: Path, k: int) -> Callable[[], None]:
    size_mb = sum(f.stat().st_size for f in [folder / "fl_checkpoint"]) / 2**20
    model = build_model(size_mb)
    return lambda: _naive(folder, k, model)


def _naive(folder: Path, k: int, model: Any) -> None:
    named = folder / "naive.weights.h5"

    def weights_of(path: Path) -> list[Any]:
        shutil.copyfile(path, named)
        model.load_weights(named)
        return model.get_weights()

    base = weights_of(folder / "fl_checkpoint")
    total_weight = sum(int((folder / f"weight{i}").read_text()) for i in range(1, k + 1))
    sums = [w * 0 for w in base]
    for index in range(1, k + 1):
        sums = [s + w for s, w in zip(sums, weights_of(folder / f"agg{index}"), strict=True)]
    model.set_weights([b + s / total_weight for b, s in zip(base, sums, strict=True)])
    model.save_weights(named)


WORKERS = {"raw": work_raw, "sum": work_sum, "ours": work_ours, "naive": work_naive}
PARTS = ["aggregation", "checkin", "fanout", "round", "strategies"]
#: What ``./scripts/bench`` runs without --parts (strategies take many minutes).
DEFAULT_PARTS = ["aggregation", "checkin", "fanout", "round"]
#: The strategies with an optimizer state, timed at --strategy-case.
STATEFUL = ["fedavgm", "fedadagrad", "fedadam", "fedyogi"]
#: The mode of FedAvg with differential privacy's noise, timed at --strategy-case too.
DP = "dp"


def worker_main(mode: str, folder: Path, k: int) -> None:
    mode, _, strategy = mode.partition(":")
    if mode == "naive":
        build_model(1)  # import Keras and warm it up outside the timing
    # What is not the work itself: outside the clock.
    run = work_ours(folder, k, strategy) if strategy else WORKERS[mode](folder, k)
    reset_peak_rss()
    before = current_rss_bytes()

    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_extra_bytes": peak_rss_bytes() - before}))


def measure(mode: str, folder: Path, k: int) -> dict[str, float]:
    kept = folder / "kept"
    kept.unlink(missing_ok=True)
    shutil.copyfile(folder / "fl_checkpoint.orig", folder / "fl_checkpoint")
    # serve links the current checkpoint into its history (KEEP_CHECKPOINTS >= 1), so
    # the one an aggregation replaces stays on disk: freeing its blocks (0.2 s for 1 GB
    # here) is the pruning of the oldest kept one, another step than the aggregation.
    os.link(folder / "fl_checkpoint", kept)
    (folder / "state-new.h5").unlink(missing_ok=True)  # serve writes each round's state anew
    # Put the copy (and the previous run's files) on disk first: otherwise our
    # fsync, which the references do not do, would also wait for the bench's own writes.
    os.sync()
    result = subprocess.run(

        [sys.executable, __file__, "--worker", mode, str(folder), str(k)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


#: K=2 weighs the cost of writing most, K=16 shows memory flat in K, 1 GB is a big model.
DEFAULT_CASES = [(100.0, 2), (100.0, 8), (100.0, 16), (1000.0, 2)]


def case(text: str) -> tuple[float, int]:
    size, _, k = text.partition("x")
    return float(size), int(k)


def bench_aggregation(
    cases: list[tuple[float, int]], repeat: int, naive: bool, strategy_case: tuple[float, int]
) -> tuple[list[dict], list[dict]]:
    """The rows of each case, and of each stateful strategy at ``strategy_case``."""
    import h5py

    rows, strategies = [], []
    for size_mb, k in cases:
        with tempfile.TemporaryDirectory(prefix="fl-bench-") as name:
            folder = Path(name)
            paths = make_files(folder, size_mb, k)
            shutil.copyfile(paths[0], folder / "fl_checkpoint.orig")
            model_bytes = paths[0].stat().st_size
            with h5py.File(paths[0], "r") as file:
                largest = max(file[n].nbytes for n in _floats(file))
            modes = ["raw", "sum", "ours"] + (["naive"] if naive else [])
            if (size_mb, k) == strategy_case:
                for strategy in STATEFUL:  # an untimed first round writes its state
                    measure(f"ours:{strategy}", folder, k)
                    os.replace(folder / "state-prepared.h5", folder / f"state-{strategy}.h5")
                modes += [f"ours:{strategy}" for strategy in [*STATEFUL, DP]]
            runs = [{mode: _measure_mode(mode, folder, k) for mode in modes} for _ in range(repeat)]
            input_bytes = (k + 1) * model_bytes

            median = functools.partial(_median, runs)

            case_figures = {
                "size_mb": round(model_bytes / 2**20, 1),
                "k": k,
                "largest_array_mb": round(largest / 2**20, 1),
            }
            row = {
                **case_figures,
                "pairs": repeat,
                "raw_s": median("raw"),
                "sum_s": median("sum"),
                "raw_mb_per_s": input_bytes / median("raw") / 2**20,
                **_ours_figures(runs, "ours", input_bytes),
            }
            if naive:
                row["naive_s"] = median("naive")
                row["speedup_over_naive"] = row["naive_s"] / row["ours_s"]
                row["naive_peak_mb"] = median("naive", "peak_extra_bytes") / 2**20
            rows.append(row)
            print_row(row)
            strategies += [
                {"strategy": mode.partition(":")[2], **case_figures,
                 **_ours_figures(runs, mode, input_bytes)}
                for mode in modes
                if mode.startswith("ours:")
            ]  # fmt: skip
    return rows, strategies


def _measure_mode(mode: str, folder: Path, k: int) -> dict[str, float]:
    """:func:`measure`; a strategy's run starts from its prepared state."""
    if mode.startswith("ours:") and mode != f"ours:{DP}":
        state = folder / f"state-{mode.partition(':')[2]}.h5"
        shutil.copyfile(state, folder / "state-prepared.h5")
    return measure(mode, folder, k)


def _ours_figures(
    runs: list[dict[str, dict[str, float]]], mode: str, input_bytes: int
) -> dict[str, float]:
    """The figures of ``mode`` (``ours``, or ``ours:<strategy>``): median time,
    throughput and peak memory, and its paired ratios to the raw read and the sum."""
    seconds = _median(runs, mode)
    figures = {
        "ours_s": seconds,
        "ours_mb_per_s": input_bytes / seconds / 2**20,
        "ours_peak_mb": _median(runs, mode, "peak_extra_bytes") / 2**20,
    }
    for reference in ("raw", "sum"):
        ratios = sorted(run[reference]["seconds"] / run[mode]["seconds"] for run in runs)
        figures[f"ratio_to_{reference}"] = statistics.median(ratios)
        figures[f"ratio_to_{reference}_min"] = ratios[0]
        figures[f"ratio_to_{reference}_max"] = ratios[-1]
    return figures


def _median(runs: list[dict[str, dict[str, float]]], mode: str, key: str = "seconds") -> float:
    """The median of ``key`` over the runs of ``mode``."""
    return statistics.median(run[mode][key] for run in runs)


def _floats(file: Any) -> list[str]:
    """Names of the checkpoint's weight arrays (the benchmark's files are float32)."""
    from fl_coordinator.storage.weights import read_plan

    return [weight.name for weight in read_plan(file, Path(file.filename))]


HEADER = (
    f"{'model MB':>9} {'K':>3} {'largest MB':>10} {'ours MB/s':>10} {'raw MB/s':>9} "
    f"{'raw/ours min/med/max':>20} {'sum/ours min/med/max':>20} {'vs naive':>9} "
    f"{'ours peak MB':>12}"
)


def _spread(row: dict, reference: str) -> str:
    key = f"ratio_to_{reference}"
    return f"{row[key + '_min']:.2f}/{row[key]:.2f}/{row[key + '_max']:.2f}"


def print_row(row: dict) -> None:
    naive = f"{row['speedup_over_naive']:>8.1f}x" if "naive_s" in row else f"{'-':>9}"
    print(
        f"{row['size_mb']:>9.0f} {row['k']:>3} {row['largest_array_mb']:>10.0f} "
        f"{row['ours_mb_per_s']:>10.0f} {row['raw_mb_per_s']:>9.0f} "
        f"{_spread(row, 'raw'):>20} {_spread(row, 'sum'):>20} {naive} "
        f"{row['ours_peak_mb']:>12.0f}",
        flush=True,
    )


def print_strategy_rows(rows: list[dict]) -> None:
    print(f"\n{'strategy':>10} {'model MB':>9} {'K':>3} {'ours MB/s':>10} "
          f"{'raw/ours min/med/max':>20} {'sum/ours min/med/max':>20} "
          f"{'ours peak MB':>12}")  # fmt: skip
    for row in rows:
        print(f"{row['strategy']:>10} {row['size_mb']:>9.0f} {row['k']:>3} "
              f"{row['ours_mb_per_s']:>10.0f} {_spread(row, 'raw'):>20} "
              f"{_spread(row, 'sum'):>20} {row['ours_peak_mb']:>12.0f}", flush=True)  # fmt: skip


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI): small sizes")
    parser.add_argument("--cases", type=case, nargs="+", default=DEFAULT_CASES,
                        help="aggregation: model MB x K, e.g. 100x8")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-naive", action="store_true", help="skip the Keras approach")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the JSON")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=DEFAULT_PARTS)
    parser.add_argument(
        "--strategy-case",
        type=case,
        default=(1000.0, 2),
        help="aggregation: the case also timed with each stateful strategy",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="strategies: data splits")  # fmt: skip
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES_COMPARED,
                        help="strategies: which to run")  # fmt: skip
    parser.add_argument("--federation-rounds", type=int, default=20, help="strategies: rounds")
    parser.add_argument("--subscribers", type=int, default=1000, help="fan-out subscribers")
    parser.add_argument("--stalled", type=int, default=10, help="fan-out: never-reading ones")
    parser.add_argument("--changes", type=int, default=50, help="fan-out: status changes timed")
    parser.add_argument("--callers", type=int, nargs="+", default=[1, 16], help="check-ins")
    parser.add_argument("--seconds", type=float, default=3.0, help="check-ins: per run")
    parser.add_argument("--batch", type=int, default=100, help="check-ins: clients per batch")
    parser.add_argument(
        "--rounds",
        type=int,
        default=100,
        help="round overhead: rounds timed with 10 selectors (scaled for others)",
    )
    parser.add_argument(
        "--selectors",
        type=int,
        nargs="+",
        default=[10, 100, 500],
        help="round overhead: numbers of fake selectors",
    )
    parser.add_argument(
        "--round-without",
        nargs="+",
        default=[],
        choices=DUTIES,
        help="round overhead, what-if: ours with these storage duties stubbed",
    )
    args = parser.parse_args()
    if args.round_without and "round" not in args.parts:
        parser.error("--round-without stubs duties of the round part: add round to --parts")
    args.round_without = list(dict.fromkeys(args.round_without))  # each duty once, in order
    if args.quick:
        args.cases, args.repeat = [(16.0, 2), (16.0, 4)], 1
        args.strategy_case = (16.0, 2)
        args.subscribers, args.changes = 50, 10
        args.seconds, args.rounds, args.selectors = 0.5, 5, [10]
        args.seeds, args.strategies, args.federation_rounds = [0], ["fedavg", "fedyogi"], 2
    logging.getLogger("purerpc").setLevel(logging.ERROR)  # torn-down connections, by design
    results: dict[str, Any] = {}
    if "aggregation" in args.parts:
        print(f"aggregation ({args.repeat} paired runs, medians; throughput = input bytes/s; "
              "ratios: reference time / ours)")  # fmt: skip
        print(HEADER)
        rows, strategies = bench_aggregation(
            args.cases, args.repeat, not args.no_naive, args.strategy_case
        )
        results["aggregation"] = rows
        if strategies:
            results["aggregation_strategies"] = strategies
            print_strategy_rows(strategies)
    if "fanout" in args.parts:
        from bench_fanout import bench_fanout

        print(f"\nfan-out (a status change to {args.subscribers} websocket subscribers, "
              f"without and with {args.stalled} that never read)")  # fmt: skip
        results["fanout"] = bench_fanout(args.subscribers, args.stalled, args.changes)
    if "checkin" in args.parts:
        from bench_checkin import bench_checkin

        print(f"\ncheck-ins (ClientCountUpdate from a grpc.aio load process, "
              f"{args.seconds:g} s per run, best of {args.repeat})")  # fmt: skip

        results["checkin"] = bench_checkin(args.callers, args.seconds, args.batch, args.repeat)
    if "round" in args.parts:
        from bench_round import bench_round

        print(f"\nround overhead (tiny checkpoint, fake selectors with one client each, "
              f"{args.repeat} paired runs)")  # fmt: skip
        if args.round_without:
            print(what_if(args.round_without))
        results["round"] = bench_round(args.rounds, args.selectors, args.repeat, args.round_without)
    args.out.mkdir(parents=True, exist_ok=True)
    if "strategies" in args.parts:
        from bench_strategies import bench_strategies

        print(f"\nstrategies (the demo's digits federation, Dirichlet(0.1), "
              f"{args.federation_rounds} rounds, seeds {args.seeds})")  # fmt: skip
        results["strategies"] = bench_strategies(
            args.strategies, args.seeds, args.federation_rounds, args.out, quick=args.quick
        )
    target = args.out / "bench.json"
    target.write_text(json.dumps(results, indent=2) + "\n")
    command = "./scripts/bench " + " ".join(sys.argv[1:])
    (args.out / "bench.md").write_text(markdown(results, command.strip()))
    print(f"written: {target} and {args.out / 'bench.md'} (the same figures as Markdown)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
