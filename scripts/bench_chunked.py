"""One averaging pass over K inputs stored in chunks, paired with the same values in plain files.

A selector chooses its aggregate's layout. For each layout (see LAYOUTS) and
each combination (mean, median), K inputs of one (N, N) float32 array are
written once, then the pass over them and the pass over plain files of the
same values run alternately ``--repeat`` times (a change in the machine's
load touches both alike). Reported: seconds of the pass (min / median / max),
the ratio chunked / plain of the medians, and the bytes the process read
(``rchar``) per byte of the inputs' files. Each pass starts from the same
global checkpoint (copied back), so every run does the same work.

    .venv/bin/python scripts/bench_chunked.py [--k 10] [--n 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from fl_coordinator.core.strategy import Combination, Strategy
from fl_coordinator.storage.aggregation import Contribution, ServerUpdate, aggregate
from fl_coordinator.storage.untrusted import UntrustedFile

NAME = "layers/w/vars/0"

#: A selector's choice: h5py's create_dataset options for an (n, n) array.
LAYOUTS = {
    "plain": lambda n: {},
    "rows (1048, n)": lambda n: {"chunks": (min(n, 1048), n)},
    "rows (1048, n), filtered": lambda n: {"chunks": (min(n, 1048), n), "shuffle": True,
                                           "fletcher32": True},
    "columns (n, 1)": lambda n: {"chunks": (n, 1)},
    "columns (n, 1), filtered": lambda n: {"chunks": (n, 1), "shuffle": True,
                                           "fletcher32": True},
    "squares (256, 256), filtered": lambda n: {"chunks": (min(n, 256),) * 2, "fletcher32": True},
}  # fmt: skip


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def write_inputs(folder: Path, layout: str, k: int, n: int) -> list[Contribution]:
    rng = np.random.default_rng(1)  # the same values for every layout
    parts = []
    for index in range(k):
        (folder / f"s{index}").mkdir(parents=True)
        with h5py.File(folder / f"s{index}/agg", "w") as file:
            values = rng.normal(size=(n, n)).astype(np.float32)
            file.create_dataset(NAME, data=values, **LAYOUTS[layout](n))
        parts.append(Contribution(f"s{index}", UntrustedFile(folder, f"s{index}/agg"), index + 1))
    return parts


def one_pass(
    start: Path, folder: Path, parts: list[Contribution], method: str
) -> tuple[float, int]:
    """Seconds and bytes read of one pass from ``start``."""
    shutil.copyfile(start, folder / "fl_checkpoint")
    update = ServerUpdate(Strategy(combination=Combination(method)))
    before, began = rchar(), time.perf_counter()
    aggregate(folder / "fl_checkpoint", parts, folder / "tmp", None, update)
    return time.perf_counter() - began, rchar() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=10, help="inputs (selectors)")
    parser.add_argument("--n", type=int, default=2000, help="the array is (n, n) float32")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--layouts", nargs="+", choices=list(LAYOUTS)[1:], default=list(LAYOUTS)[1:]
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        start = Path(root) / "start"
        with h5py.File(start, "w") as file:
            file[NAME] = np.random.default_rng(0).normal(size=(args.n, args.n)).astype(np.float32)
        plain = write_inputs(Path(root) / "plain", "plain", args.k, args.n)
        size = sum(p.checkpoint.path.stat().st_size for p in plain)
        print(f"K = {args.k} inputs of ({args.n}, {args.n}) float32, {size / 1e6:.0f} MB")
        print(f"{'layout':30s} {'method':7s} {'seconds min/med/max':>22s} {'plain med':>9s} "
              f"{'ratio':>6s} {'read/inputs':>11s}")  # fmt: skip
        for layout in args.layouts:
            folder = Path(root) / layout.replace(" ", "_")
            parts = write_inputs(folder, layout, args.k, args.n)
            chunked_size = sum(p.checkpoint.path.stat().st_size for p in parts)
            for method in ("mean", "median"):
                ours, base, read = [], [], 0
                for _ in range(args.repeat):
                    seconds, read = one_pass(start, folder, parts, method)
                    ours.append(seconds)
                    base.append(one_pass(start, Path(root) / "plain", plain, method)[0])
                median, plain_median = statistics.median(ours), statistics.median(base)
                print(f"{layout:30s} {method:7s} {min(ours):6.2f} {median:6.2f} {max(ours):6.2f}"
                      f"       {plain_median:6.2f} {median / plain_median:6.1f} "
                      f"{read / chunked_size:10.2f}x")  # fmt: skip
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
