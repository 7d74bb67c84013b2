"""Client-level differential privacy on a served coordinator: the noise is calibrated, the
weights are bounded, the privacy spent is dp-accounting's figure, kept across restarts and
rollbacks, and the run ends at its budget."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dp_accounting
import h5py
import numpy as np
import pytest
import trio
from dp_accounting.rdp import RdpAccountant
from helpers.peers import completed, read_floats, run_round, watch

from fl_coordinator.app import build_coordinator, serve
from fl_coordinator.cli.watch import summary
from fl_coordinator.config import Settings
from fl_coordinator.errors import ConfigError, ProblemError
from fl_coordinator.status.hub import StatusHub
from fl_coordinator.status.metrics import Metrics
from fl_coordinator.storage.aggregation import AggregationResult, Contribution, ServerUpdate
from fl_coordinator.storage.aggregation import aggregate as real_aggregate
from fl_coordinator.storage.journal import journal_path, rollback
from fl_coordinator.storage.layout import Layout
from fl_coordinator.storage.weights import read_plan

Z, C, GOAL, POPULATION, DELTA = 1.5, 2.0, 2, 100, 1e-5


def dp_settings(settings: Settings, **changes: Any) -> Settings:
    return settings.replace(
        checkin_limit=GOAL,
        dp_noise_multiplier=Z,
        dp_clip_norm=C,
        dp_population=POPULATION,
        dp_delta=DELTA,
        **changes,
    )


def expected_epsilon(rounds: int, q: float = GOAL / POPULATION, z: float = Z) -> float:
    """What dp-accounting itself gives for ``rounds`` Poisson-sampled Gaussian rounds."""
    accountant = RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(DELTA))


def zero_update(source: Path, dest: Path) -> Path:
    """A real Keras weights file with every weight array set to 0: an aggregate of nothing."""
    shutil.copyfile(source, dest)
    with h5py.File(dest, "r+") as file:
        for weight in read_plan(file, dest):
            file[weight.name][...] = 0
    return dest


def seeded(seeds: itertools.count[int]) -> Any:
    """The real aggregation, with the noise drawn from a seeded generator (one per round)."""

    def run(
        checkpoint: Path,
        contributions: Sequence[Contribution],
        tmp_dir: Path,
        cancel: Any,
        update: ServerUpdate,
    ) -> AggregationResult:
        noise = np.random.default_rng(next(seeds))
        return real_aggregate(
            checkpoint, contributions, tmp_dir, cancel, dataclasses.replace(update, noise=noise)
        )

    return run


async def serve_rounds(
    settings: Settings,
    inputs: Sequence[tuple[Path, int]],
    numbers: Sequence[int],
    seeds: itertools.count[int] | None = None,
) -> list[dict[str, Any]]:
    """A coordinator serving rounds ``numbers`` (each averaging ``inputs``); every status
    message it published, until the last round ended and the next stage was shown."""
    layout = Layout.from_settings(settings)
    aggregator = seeded(seeds or itertools.count())
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(functools.partial(serve, settings, aggregator=aggregator))
        watcher = await watch(nursery, endpoints.status_url)
        for number in numbers:
            done = await run_round(nursery, endpoints.grpc_port, watcher, layout, inputs, number)
            assert done["stage"] == "COMPLETED", done.get("error")
        last = numbers[-1] if numbers else 0
        await watcher.wait_for(lambda m: m["round"] > last or m["stage"] == "FINISHED")
        nursery.cancel_scope.cancel()
    return watcher.messages


async def first_status(settings: Settings) -> dict[str, Any]:
    """The first status message of a coordinator started on ``settings``."""
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(serve, settings)
        watcher = await watch(nursery, endpoints.status_url)
        message = await watcher.wait_for(lambda m: True)
        nursery.cancel_scope.cancel()
    return message


async def test_with_zero_updates_the_weights_move_by_the_calibrated_noise_alone(
    settings: Settings, layout: Layout, keras_weights: list[Path], tmp_path: Path
) -> None:
    settings = dp_settings(settings)
    zero = zero_update(keras_weights[0], tmp_path / "zero.weights.h5")
    rounds = [1, 2, 3]
    before = read_floats(layout.checkpoint)
    changes = []
    async with trio.open_nursery() as nursery:
        aggregator = seeded(itertools.count(7))
        endpoints = await nursery.start(functools.partial(serve, settings, aggregator=aggregator))
        watcher = await watch(nursery, endpoints.status_url)
        for number in rounds:
            inputs = [(zero, 1), (zero, 1)]
            done = await run_round(nursery, endpoints.grpc_port, watcher, layout, inputs, number)
            assert done["stage"] == "COMPLETED", done.get("error")
            after = read_floats(layout.checkpoint)
            for name, values in after.items():
                changes.append(values.astype(np.float64) - before[name].astype(np.float64))
            before = after
        nursery.cancel_scope.cancel()
    change = np.concatenate([c.ravel() for c in changes])
    n = change.size
    assert n == 3 * 2410  # the built-in model's coordinates, three rounds
    sigma = Z * C / GOAL  # 1.5: the noise of the sum, over the fixed denominator
    # Five standard errors: the mean's is sigma/sqrt(n), the sample std's relative one
    # 1/sqrt(2n) (n = 7230: 0.059 and 4.2 %). float32 rounding of the weights is 1e-7.
    assert abs(change.mean()) < 5 * sigma / math.sqrt(n)
    assert change.std() == pytest.approx(sigma, rel=5 / math.sqrt(2 * n))
    # Gaussian, not merely of the right spread: 95.45 % within two sigma (5 standard errors).
    within = np.mean(np.abs(change) < 2 * sigma)
    assert within == pytest.approx(0.9545, abs=5 * math.sqrt(0.9545 * 0.0455 / n))
    assert np.unique(change).size > 0.99 * n  # a fresh draw per coordinate and round


async def test_the_noise_comes_from_the_operating_system_unless_a_test_seeds_it(
    settings: Settings, layout: Layout, keras_weights: list[Path], tmp_path: Path
) -> None:
    zero = zero_update(keras_weights[0], tmp_path / "zero.weights.h5")
    checkpoints = []
    for copy in range(2):  # the same problem, the same inputs, twice: different noise
        root = tmp_path / f"root{copy}"
        shutil.copytree(layout.root, root)
        other = dp_settings(settings, fl_root_path=str(root))
        async with trio.open_nursery() as nursery:  # the production path: no seed given
            endpoints = await nursery.start(serve, other)
            watcher = await watch(nursery, endpoints.status_url)
            await run_round(nursery, endpoints.grpc_port, watcher, Layout.from_settings(other),
                            [(zero, 1), (zero, 1)])  # fmt: skip
            nursery.cancel_scope.cancel()
        checkpoints.append(read_floats(Layout.from_settings(other).checkpoint))
    name = next(iter(checkpoints[0]))
    assert not np.array_equal(checkpoints[0][name], checkpoints[1][name])


@pytest.mark.parametrize("dp", [True, False])
async def test_a_selector_claiming_more_weight_than_its_clients_is_rejected_under_dp(
    settings: Settings, layout: Layout, keras_weights: list[Path], tmp_path: Path, dp: bool
) -> None:
    zero = zero_update(keras_weights[0], tmp_path / "zero.weights.h5")
    settings = dp_settings(settings) if dp else settings.replace(checkin_limit=GOAL)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(serve, settings)
        watcher = await watch(nursery, endpoints.status_url)
        # Two selectors of one client each; the first claims the weight of 3 clients.
        done = await run_round(nursery, endpoints.grpc_port, watcher, layout,
                               [(zero, 3), (zero, 1)])  # fmt: skip
        nursery.cancel_scope.cancel()
    if not dp:
        assert done["stage"] == "COMPLETED" and done["rejected"] == {}
        return
    [(selector, reason)] = done["rejected"].items()
    assert done["reported"] == [s for s in done["selectors"] if s != selector]
    assert reason == (
        "weight 3 exceeds the 1 client(s) it was accepted for; under differential privacy "
        "each client counts once (weight 1)"
    )


async def test_a_selector_whose_update_is_longer_than_its_clients_may_send_is_rejected(
    settings: Settings, layout: Layout, keras_weights: list[Path], tmp_path: Path
) -> None:
    zero = zero_update(keras_weights[0], tmp_path / "zero.weights.h5")
    norm = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2))
                         for a in read_floats(keras_weights[1]).values()))  # fmt: skip
    assert norm > C  # a whole model, not an update clipped to C
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(serve, dp_settings(settings))
        watcher = await watch(nursery, endpoints.status_url)
        done = await run_round(nursery, endpoints.grpc_port, watcher, layout,
                               [(keras_weights[1], 1), (zero, 1)])  # fmt: skip
        nursery.cancel_scope.cancel()
    [reason] = done["rejected"].values()
    assert reason == (
        f"its update's L2 norm {norm:.6g} exceeds weight x DP_CLIP_NORM = 1 x 2: its clients' "
        "updates were not clipped"
    )


async def test_epsilon_after_each_round_is_dp_accountings_own_figure(
    settings: Settings, layout: Layout, keras_weights: list[Path], tmp_path: Path
) -> None:
    zero = zero_update(keras_weights[0], tmp_path / "zero.weights.h5")
    settings = dp_settings(settings)
    messages = await serve_rounds(settings, [(zero, 1), (zero, 1)], [1, 2, 3])
    assert messages[0]["epsilon"] == 0.0 and messages[0]["delta"] == DELTA
    for number in (1, 2, 3):
        [done] = [m for m in messages if completed(number)(m)]
        assert done["epsilon"] == pytest.approx(expected_epsilon(number), rel=1e-12)
        assert done["delta"] == DELTA
    assert 0 < expected_epsilon(1) < expected_epsilon(2) < expected_epsilon(3)
    # Each round's record in the history (GET /rounds, rounds.jsonl) keeps its figure.
    records = [json.loads(line) for line in (layout.own / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["epsilon"], r["delta"]) for r in records] == [
        (n, pytest.approx(expected_epsilon(n), rel=1e-12), DELTA) for n in (1, 2, 3)
    ]
    # Shown by `watch`, and as Prometheus gauges derived from the same messages.
    assert f"privacy epsilon {expected_epsilon(3):.4g} at delta 1e-05" in summary(done)
    metrics = Metrics("p")
    for message in messages:
        metrics.observe(message)  # type: ignore[arg-type]
    exported = metrics.render().decode()
    [epsilon] = re.findall(r"^fl_coordinator_privacy_epsilon (\S+)$", exported, re.M)
    [delta] = re.findall(r"^fl_coordinator_privacy_delta (\S+)$", exported, re.M)
    assert (float(epsilon), float(delta)) == (pytest.approx(expected_epsilon(3)), DELTA)
    without = Metrics("p")
    without.observe({k: v for k, v in done.items() if k not in ("epsilon", "delta")})  # type: ignore[arg-type]
    assert "privacy" not in without.render().decode()  # no DP: no gauge at all, not a 0


async def test_the_run_ends_at_the_budget_stays_ended_and_a_rollback_gives_nothing_back(
    settings: Settings, layout: Layout, keras_weights: list[Path], tmp_path: Path
) -> None:
    zero = zero_update(keras_weights[0], tmp_path / "zero.weights.h5")
    two, three = expected_epsilon(2), expected_epsilon(3)
    budget = (two + three) / 2  # two rounds fit, a third would not
    settings = dp_settings(settings, dp_max_epsilon=budget)
    messages = await serve_rounds(settings, [(zero, 1), (zero, 1)], [1, 2])
    finished = messages[-1]
    assert (finished["round"], finished["stage"]) == (2, "FINISHED")
    assert finished["epsilon"] == pytest.approx(two, rel=1e-12)
    assert finished["finished"].startswith(
        f"one more round would spend epsilon={three:.4g} at delta=1e-05 (after 2 round(s): "
        f"{two:.4g}), over DP_MAX_EPSILON={budget:g}"
    )
    restarted = await first_status(settings)
    assert (restarted["stage"], restarted["epsilon"]) == ("FINISHED", finished["epsilon"])
    rollback(layout, 1)  # round 1's checkpoint again: its two releases were seen all the same
    again = await first_status(settings)
    assert (again["stage"], again["epsilon"]) == ("FINISHED", finished["epsilon"])
    # Without a budget the run goes on, from two rounds spent, not one.
    messages = await serve_rounds(settings.replace(dp_max_epsilon=None), [(zero, 1), (zero, 1)],
                                  [3])  # fmt: skip
    assert messages[0]["epsilon"] == pytest.approx(two, rel=1e-12)
    [done] = [m for m in messages if completed(3)(m)]
    assert done["epsilon"] == pytest.approx(three, rel=1e-12)


def test_a_ledger_that_cannot_be_read_stops_the_start_up_rather_than_forget(
    settings: Settings, layout: Layout
) -> None:
    ledger = layout.own / "privacy.json"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_text('{"releases": [{"round": 1, "q": 0.02}]}')  # cut short
    with pytest.raises(ProblemError) as error:
        build_coordinator(dp_settings(settings), layout, StatusHub("p", "c"))
    assert str(error.value) == (
        f"{ledger}: not a readable privacy ledger ('z'); the privacy already spent is unknown: "
        "restore the file from a backup (it is never rewritten with less)"
    )


def test_a_noise_multiplier_too_small_to_bound_epsilon_is_refused_at_start_up(
    settings: Settings, layout: Layout
) -> None:
    """z = 1e-300 squares to 0: the accountant's epsilon is Infinity, which the status stream
    and rounds.jsonl carried as non-JSON ``Infinity`` after one round; now no round runs."""
    with pytest.raises(ConfigError) as error:
        tiny = dp_settings(settings).replace(dp_noise_multiplier=1e-300)
        build_coordinator(tiny, layout, StatusHub("p", "c"))
    assert str(error.value) == (
        "configuration error: DP_NOISE_MULTIPLIER=1e-300: expected a noise multiplier large "
        "enough to bound the privacy spent (the accountant finds no finite epsilon for "
        f"q={GOAL / POPULATION:g} z=1e-300)"
    )
    assert not (layout.own / "privacy.json").exists()  # nothing released, nothing recorded


def test_a_ledger_whose_rounds_have_no_finite_epsilon_stops_the_start_up(
    settings: Settings, layout: Layout
) -> None:
    ledger = layout.own / "privacy.json"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    ledger.write_text('{"releases": [{"round": 1, "q": 0.02, "z": 0, "clip_norm": 2}]}')
    with pytest.raises(ProblemError) as error:
        build_coordinator(dp_settings(settings), layout, StatusHub("p", "c"))
    assert str(error.value) == (
        f"{ledger}: the accountant finds no finite epsilon for q=0.02 z=0: the privacy spent "
        "is unbounded"
    )


async def test_a_round_number_released_again_is_counted_again(
    settings: Settings, layout: Layout, keras_weights: list[Path], tmp_path: Path
) -> None:
    """Round numbers can start over (the journal moved away, as its own error advises: the
    next run opens round 1): each release is counted, not each round number."""
    zero = zero_update(keras_weights[0], tmp_path / "zero.weights.h5")
    settings = dp_settings(settings)
    await serve_rounds(settings, [(zero, 1), (zero, 1)], [1, 2])
    journal_path(layout).unlink()
    messages = await serve_rounds(settings, [(zero, 1), (zero, 1)], [1])
    assert messages[0]["epsilon"] == pytest.approx(expected_epsilon(2), rel=1e-12)
    [done] = [m for m in messages if completed(1)(m)]
    assert done["epsilon"] == pytest.approx(expected_epsilon(3), rel=1e-12)
    ledger = json.loads((layout.own / "privacy.json").read_text())
    assert [release["round"] for release in ledger["releases"]] == [1, 2, 1]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # and the overflow is tested quietly
async def test_noise_too_large_for_the_checkpoints_dtype_names_the_dp_keys(
    settings: Settings, keras_weights: list[Path], tmp_path: Path
) -> None:
    """z x C = 1e40 overflows float32: the round fails naming the DP keys, not only the
    server step's (SERVER_LEARNING_RATE, STRATEGY, TAU), which are not the cause."""
    zero = zero_update(keras_weights[0], tmp_path / "zero.weights.h5")
    loud = dp_settings(settings).replace(dp_noise_multiplier=1e20, dp_clip_norm=1e20)
    async with trio.open_nursery() as nursery:
        endpoints = await nursery.start(serve, loud)
        watcher = await watch(nursery, endpoints.status_url)
        layout = Layout.from_settings(loud)
        done = await run_round(nursery, endpoints.grpc_port, watcher, layout, [(zero, 1)] * 2, 1)
        nursery.cancel_scope.cancel()
    assert done["stage"] == "FAILED"
    assert (
        "DP_NOISE_MULTIPLIER x DP_CLIP_NORM = 1e+40 (the noise's standard deviation)"
        in (done["error"])
    )
