"""``fl-coordinator demo``: a whole federation on this machine, compared with centralized training.

It creates a fresh problem folder, starts the coordinator, S selectors and C
clients as separate processes talking gRPC over 127.0.0.1, and follows the
rounds through the coordinator's websocket status stream, like a webserver
would. The coordinator itself evaluates each new global checkpoint on a
held-out test set (``EVALUATE=fl_coordinator.federation.evaluation:digits``,
in its evaluation worker process) and ends the run after the last round
(``ROUNDS``); the demo reads the metrics from the stream. At the end it
trains the same model on the pooled data for the same total number of epochs
(the centralized baseline), prints a summary, and leaves ``summary.json`` and
``accuracy.png`` in the root folder.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio
import trio_websocket

from ..config import default_settings
from ..errors import ChildFailed, DemoError, first_of
from ..storage.layout import Layout
from ..storage.ownership import ensure_not_served
from ..storage.problem import init_problem
from .data import Split, split_digits, write_shards
from .evaluation import SEED_VARIABLE, scores
from .local import LocalFederation
from .training import Hyper, compile_for_training, load_weights

__all__ = ["DEMO_MARKER", "DemoOptions", "accuracy_figure", "run_demo"]

#: Without any status message for this long, the demo gives up and points at the logs.
_STALL_SECONDS = 180.0


@dataclass(frozen=True)
class DemoOptions:
    root: Path = Path("demo")
    selectors: int = 2
    clients: int = 6
    rounds: int = 10
    hyper: Hyper = field(default_factory=Hyper)
    alpha: float = 0.5
    seed: int = 0
    strategy: str = "fedavg"
    #: Differential privacy's noise multiplier z (None: off; 0: clipped updates, no noise).
    noise_multiplier: float | None = None
    clip_norm: float = 1.0  # C, with noise_multiplier

    @property
    def dp_environment(self) -> dict[str, str]:
        """The coordinator's DP keys: its population is the demo's clients, all sampled
        each round (q = 1); z = 0 leaves the coordinator's DP off (nothing to account)."""
        if not self.noise_multiplier:
            return {}
        return {
            "DP_NOISE_MULTIPLIER": str(self.noise_multiplier),
            "DP_CLIP_NORM": str(self.clip_norm),
            "DP_POPULATION": str(self.clients),
            "DP_DELTA": str(DEMO_DELTA),
        }


#: The delta the demo's epsilon is reported at.
DEMO_DELTA = 1e-5


#: The coordinator's evaluation of each round: the demo's own, shipped in the package.
EVALUATE = "fl_coordinator.federation.evaluation:digits"


@dataclass
class _RoundResult:
    round: int
    accuracy: float | None  # None: its evaluation was skipped (a later round's came first)
    seconds: float
    clients: int
    loss: float | None = None


#: The file that says a folder is a demo's, which the next demo may empty. A folder's contents
#: cannot say it: every problem folder has ``initFiles/`` (and ``summary.json`` or ``clients/``
#: are names anyone may use), and the demo emptied such folders, checkpoints, history and
#: selectors' folders included.
DEMO_MARKER = ".fl-coordinator-demo"


def _fresh_root(layout: Layout) -> None:
    """Empty ``layout.root`` if a demo made it (and no coordinator serves it); refuse to wipe
    anything else."""
    root = layout.root
    if root.exists():
        if not root.is_dir():
            raise DemoError(f"--root {root} is a file; choose a folder")
        if any(root.iterdir()):
            if not (root / DEMO_MARKER).is_file():
                raise DemoError(
                    f"--root {root} is not empty and not a previous demo (it has no "
                    f"{DEMO_MARKER}); choose another, or remove it if it is an older demo's"
                )
            ensure_not_served(layout, "demo")
    try:
        _empty(root)
        (root / "logs").mkdir(parents=True)
    except OSError as error:
        raise DemoError(f"--root {root}: cannot make this folder ({error.strerror})") from None
    (root / DEMO_MARKER).write_text(
        "made by fl-coordinator demo: the next demo with this --root empties this folder\n"
    )


def _empty(root: Path) -> None:
    """Remove what ``root`` holds (if it exists), the marker last, and keep ``root``
    itself: it may be a mount point (a volume), or in a folder the user cannot write to,
    where removing it failed (EBUSY, EACCES) after emptying it."""
    if not root.exists():
        return
    for child in sorted(root.iterdir(), key=lambda path: path.name == DEMO_MARKER):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _initial_accuracy(model_file: Path, checkpoint: Path, split: Split) -> float:
    """The accuracy of the initial model (round 0), measured here as the coordinator will."""
    from ..storage.model import import_keras

    model = import_keras().models.load_model(model_file, compile=False)
    load_weights(model, checkpoint)
    return scores(model, split.x_test, split.y_test)["accuracy"]


def _centralized_baseline(split: Split, options: DemoOptions) -> list[float]:
    """Same model and initial weights, pooled data, same total epochs; accuracy per round."""
    from ..storage.model import builtin_model

    model = builtin_model()
    compile_for_training(model, options.hyper)
    per_round = []
    for _ in range(options.rounds):
        model.fit(
            split.x_train,
            split.y_train,
            epochs=options.hyper.epochs,
            batch_size=options.hyper.batch_size,
            verbose=0,
            shuffle=True,
        )
        per_round.append(scores(model, split.x_test, split.y_test)["accuracy"])
    return per_round


class _Progress:
    """One line per round; on a terminal, a live line for the stage in between."""

    def __init__(self, out: TextIO, rounds: int) -> None:
        self.out = out
        self.rounds = rounds
        self.live = out.isatty()

    def say(self, text: str) -> None:
        print(("\r\033[K" if self.live else "") + text, file=self.out, flush=True)

    def stage(self, message: dict[str, Any]) -> None:
        if self.live:
            text = (
                f"round {message['round']:>3}/{self.rounds}  {message['stage']:<13} "
                f"clients {message['accepted']}/{message['goal']}  "
                f"reported {len(message['reported'])}/{len(message['selectors'])}"
            )
            print("\r\033[K" + text, end="", file=self.out, flush=True)

    def header(self) -> None:
        self.say(f"{'round':>9}  {'stage':<13} {'clients':>7}  {'accuracy':>8}  {'time':>7}")

    def row(self, result: _RoundResult, stage: str) -> None:
        shown = "-" if result.accuracy is None else f"{result.accuracy:.3f}"
        self.say(
            f"{result.round:>5}/{self.rounds:<3}  {stage:<13} {result.clients:>7}  "
            f"{shown:>8}  {result.seconds:>6.1f}s"
        )


def _check_training(options: DemoOptions) -> None:
    """Flags the federation cannot train with: they stalled it until the demo gave up after
    _STALL_SECONDS (--epochs 0, --batch-size 0, --learning-rate nan, --alpha 0), or were a
    traceback (--alpha -1)."""
    hyper = options.hyper
    wrong = [
        flag
        for flag, ok in (
            (f"--epochs {hyper.epochs}", hyper.epochs >= 1),
            (f"--batch-size {hyper.batch_size}", hyper.batch_size >= 1),
            (f"--learning-rate {hyper.learning_rate:g}", 0 < hyper.learning_rate < math.inf),
            (f"--momentum {hyper.momentum:g}", 0 <= hyper.momentum < 1),
            (f"--alpha {options.alpha:g}", 0 < options.alpha < math.inf),
        )
        if not ok
    ]
    if wrong:
        raise DemoError(
            f"{', '.join(wrong)}: need epochs >= 1, batch size >= 1, a learning rate > 0, "
            "a momentum in [0, 1) and an alpha > 0"
        )


class _Demo:
    def __init__(self, options: DemoOptions, out: TextIO = sys.stdout) -> None:
        if options.selectors < 1 or options.clients < options.selectors or options.rounds < 1:
            raise DemoError("need rounds >= 1, selectors >= 1 and clients >= selectors")
        _check_training(options)
        dp = options.noise_multiplier
        if dp is not None and not (dp >= 0 and options.clip_norm > 0):
            raise DemoError(f"--dp {dp:g} --clip-norm {options.clip_norm:g}: need Z >= 0, C > 0")
        self.options = options
        self.root = options.root.resolve()
        self.layout = Layout.from_settings(default_settings().replace(fl_root_path=str(self.root)))
        self.progress = _Progress(out, options.rounds)
        self.results: list[_RoundResult] = []
        self.epsilon: float | None = None  # the privacy spent, as the coordinator said

    async def run(self) -> dict[str, Any]:
        options = self.options
        _fresh_root(self.layout)
        split = split_digits(options.clients, options.alpha, options.seed)
        shards = write_shards(split, self.root / "clients")
        init_problem(self.layout)
        initial = await trio.to_thread.run_sync(
            _initial_accuracy, self.layout.model, self.layout.checkpoint, split
        )
        self.progress.say(
            f"federation: 1 coordinator ({options.strategy}), {options.selectors} selector(s), "
            f"{options.clients} client(s), {options.rounds} round(s), {options.hyper.epochs} "
            f"local epoch(s); non-IID digits (Dirichlet alpha={options.alpha}); logs in "
            f"{self.root / 'logs'}"
        )
        started = time.monotonic()
        federation = LocalFederation(
            self.root,
            options.selectors,
            shards,
            options.rounds,
            options.hyper,
            "digits-demo",
            coordinator_env={
                "STRATEGY": options.strategy,
                "EVALUATE": EVALUATE,
                SEED_VARIABLE: str(options.seed),
                "ROUNDS": str(options.rounds),
                **options.dp_environment,
            },
            clip_norm=options.clip_norm if options.noise_multiplier is not None else 0.0,
        )
        async with federation.running() as endpoints:
            await self._follow(endpoints.status_url, federation)
            with trio.move_on_after(60):
                await federation.wait_for_clients()
        federated_seconds = time.monotonic() - started
        baseline = await trio.to_thread.run_sync(_centralized_baseline, split, options)
        summary = self._summary(split, initial, baseline, federated_seconds)
        (self.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _plot(summary, self.root / "accuracy.png")
        self._print_summary(summary)
        return summary

    async def _follow(self, status_url: str, federation: LocalFederation) -> None:
        """Read the status stream until the last round is evaluated; a row per round.

        A round's row is printed once its metrics arrive (the coordinator
        evaluates it while the next round runs), or without them if a later
        round's metrics come first (its evaluation was skipped).
        """
        self.progress.header()
        opened: dict[int, float] = {}
        completed: dict[int, tuple[float, int]] = {}  # round: (seconds, clients)
        evaluated: dict[int, dict[str, float]] = {}
        async with trio_websocket.open_websocket_url(status_url) as ws:
            while self.options.rounds not in evaluated:
                with trio.move_on_after(_STALL_SECONDS) as stalled:
                    message = json.loads(await ws.get_message())
                if stalled.cancelled_caught:
                    raise DemoError(
                        f"no progress for {_STALL_SECONDS:.0f} s; see the logs in "
                        f"{self.root / 'logs'}"
                    )
                federation.check_children()
                number = message["round"]
                opened.setdefault(number, time.monotonic())
                self.progress.stage(message)
                if message["stage"] == "FAILED":
                    raise DemoError(f"round {number} failed: {message.get('error')}")
                if message["stage"] == "COMPLETED" and number not in completed:
                    completed[number] = (time.monotonic() - opened[number], message["accepted"])
                if "metrics" in message:
                    evaluated[message["metrics"]["round"]] = message["metrics"]["values"]
                if "epsilon" in message:
                    self.epsilon = message["epsilon"]
                self._rows(completed, evaluated)

    def _rows(
        self, completed: dict[int, tuple[float, int]], evaluated: dict[int, dict[str, float]]
    ) -> None:
        """Print the rows that can be printed, in order of rounds."""
        while (number := len(self.results) + 1) in completed:
            values = evaluated.get(number)
            if values is None and not any(later > number for later in evaluated):
                return  # its metrics may still come
            seconds, clients = completed[number]
            values = values or {}
            result = _RoundResult(
                number, values.get("accuracy"), seconds, clients, values.get("loss")
            )
            self.results.append(result)
            self.progress.row(result, "COMPLETED")

    def _summary(
        self, split: Split, initial: float, baseline: list[float], seconds: float
    ) -> dict[str, Any]:
        final = self.results[-1].accuracy
        return {
            "rounds": [asdict(r) for r in self.results],
            "initial_accuracy": initial,
            "final_accuracy": final,
            "baseline": {"accuracy": baseline[-1], "per_round": baseline},
            "ratio_to_baseline": final / baseline[-1],
            "federation_seconds": seconds,
            "privacy": self._privacy(),
            "settings": {
                "selectors": self.options.selectors,
                "clients": self.options.clients,
                "rounds": self.options.rounds,
                "epochs": self.options.hyper.epochs,
                "batch_size": self.options.hyper.batch_size,
                "learning_rate": self.options.hyper.learning_rate,
                "alpha": self.options.alpha,
                "seed": self.options.seed,
                "strategy": self.options.strategy,
                "test_samples": len(split.y_test),
            },
            "client_label_counts": split.label_counts().tolist(),
        }

    def _privacy(self) -> dict[str, Any] | None:
        """The DP run's parameters and the epsilon spent (None: DP off). With z = 0 the
        updates are clipped but nothing is hidden: epsilon is infinite (null in JSON)."""
        options = self.options
        if options.noise_multiplier is None:
            return None
        return {
            "noise_multiplier": options.noise_multiplier,
            "clip_norm": options.clip_norm,
            "population": options.clients,
            "sampling_rate": 1.0,
            "delta": DEMO_DELTA,
            "epsilon": self.epsilon if options.noise_multiplier else None,
        }

    def _print_summary(self, summary: dict[str, Any]) -> None:
        say = self.progress.say
        say("")
        say(
            f"federated   : test accuracy {summary['final_accuracy']:.3f} after "
            f"{len(summary['rounds'])} round(s) ({summary['federation_seconds']:.0f} s)"
        )
        say(
            f"centralized : test accuracy {summary['baseline']['accuracy']:.3f} "
            f"(same model, pooled data, {self.options.rounds * self.options.hyper.epochs} epochs)"
        )
        say(f"ratio       : {summary['ratio_to_baseline']:.3f} of the centralized baseline")
        if (privacy := summary["privacy"]) is not None:
            spent = privacy["epsilon"]
            say(
                f"privacy     : z={privacy['noise_multiplier']:g}, C={privacy['clip_norm']:g}, "
                f"q={privacy['sampling_rate']:g}: epsilon "
                f"{'infinite (no noise)' if spent is None else f'{spent:.4g}'} "
                f"at delta={privacy['delta']:g}"
            )
        say(
            f"files       : {self.root / 'summary.json'}, {self.root / 'accuracy.png'}, "
            f"global model in {self.layout.init_files}"
        )


def _plot(summary: dict[str, Any], dest: Path) -> None:
    import matplotlib.pyplot as plt

    figure = accuracy_figure(summary)
    figure.savefig(dest, dpi=100)
    plt.close(figure)


def accuracy_figure(summary: dict[str, Any]) -> Any:
    """A matplotlib figure of the demo's accuracy per round (whole rounds on the x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    # Round 0 is the initial model, the same for both.
    initial = summary["initial_accuracy"]
    rounds = [0] + [r["round"] for r in summary["rounds"] if r["accuracy"] is not None]
    federated = [initial] + [r["accuracy"] for r in summary["rounds"] if r["accuracy"] is not None]
    centralized = [initial, *summary["baseline"]["per_round"]]
    figure, axes = plt.subplots(figsize=(6.4, 4))
    strategy = summary["settings"]["strategy"]
    axes.plot(rounds, federated, "o-", label=f"federated ({strategy})")
    axes.plot(range(len(centralized)), centralized, "s--", label="centralized (same epochs)")
    axes.set_xlabel("round (centralized: epochs / local epochs)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # no round 0.5

    axes.set_ylabel("test accuracy")
    axes.set_title("digits, non-IID clients: accuracy per round")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run the demo; raise DemoError (never an exception group) if it cannot finish."""
    try:
        return trio.run(_Demo(options).run)
    except ChildFailed as error:
        raise DemoError(str(error)) from None
    except BaseExceptionGroup as group:
        failure = first_of(group, DemoError) or first_of(group, ChildFailed)
        if failure is None:
            raise
        raise DemoError(str(failure)) from None
