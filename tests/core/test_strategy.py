"""The strategies' arithmetic, against the equations written out with numpy, and STOP_WHEN."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fl_coordinator.core.stopping import RoundMetrics, StopWhen
from fl_coordinator.core.strategy import (
    DEFAULTS,
    STRATEGIES,
    Combination,
    ServerOptimizer,
)


def equations(name: str, d, x, m, v, lr, momentum=0.9, b1=0.9, b2=0.99, tau=1e-3):
    """Reddi et al. 2021, Algorithm 2 (no bias correction), and FedAvgM, in float64."""
    if name == "fedavg":
        return x + lr * d, m, v
    if name == "fedavgm":
        m = momentum * m + d
        return x + lr * m, m, v
    m = b1 * m + (1 - b1) * d
    if name == "fedadagrad":
        v = v + d**2
    elif name == "fedadam":
        v = b2 * v + (1 - b2) * d**2
    else:
        v = v - (1 - b2) * d**2 * np.sign(v - d**2)
    return x + lr * m / (np.sqrt(v) + tau), m, v


@pytest.mark.parametrize("name", STRATEGIES)
def test_three_steps_follow_the_equations(name: str) -> None:
    rng = np.random.default_rng(7)
    optimizer = ServerOptimizer.of(name, learning_rate=0.05, tau=1e-3)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    m = np.zeros((6, 5))
    v = np.full((6, 5), optimizer.tau**2)
    mine_m, mine_v = m.copy(), v.copy()
    for _ in range(3):
        d = rng.normal(scale=0.1, size=(6, 5))
        expected, m, v = equations(name, d, x.astype(np.float64), m, v, 0.05)
        out = np.empty_like(x)
        optimizer.step(d.copy(), x, out, mine_m, mine_v, np.empty_like(d))
        np.testing.assert_allclose(out, expected.astype(np.float32), rtol=1e-6)
        if optimizer.moments:
            np.testing.assert_allclose(mine_m, m, rtol=1e-12)
        if "v" in optimizer.moments:
            np.testing.assert_allclose(mine_v, v, rtol=1e-12)
        x = out


def test_default_fedavg_is_x_plus_d_bit_for_bit() -> None:
    """With the default learning rate of 1, the Go system's arithmetic: one add, one cast."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=1000).astype(np.float32)
    d = rng.normal(scale=1e-3, size=1000)
    out = np.empty_like(x)
    ServerOptimizer().step(d.copy(), x, out)
    assert out.tobytes() == (x.astype(np.float64) + d).astype(np.float32).tobytes()


def test_defaults_come_from_the_table_and_name_what_each_keeps() -> None:
    assert {name: ServerOptimizer.of(name).learning_rate for name in STRATEGIES} == {
        name: rate for name, (rate, _) in DEFAULTS.items()
    }
    assert ServerOptimizer.of("fedadam").tau == 1e-4
    assert ServerOptimizer.of("fedadam", learning_rate=0.1, tau=0.5).tau == 0.5
    assert [ServerOptimizer.of(n).moments for n in STRATEGIES] == [
        (), ("m",), ("m", "v"), ("m", "v"), ("m", "v"),
    ]  # fmt: skip
    assert ServerOptimizer.of("fedyogi").initial("v") == pytest.approx(1e-8)
    assert ServerOptimizer.of("fedyogi").initial("m") == 0.0
    with pytest.raises(ValueError, match="unknown strategy"):
        ServerOptimizer("fedsgd")


def test_median_and_trimmed_mean_ignore_one_huge_value() -> None:
    honest = np.array([[1.0, -2.0], [2.0, -1.0], [3.0, -3.0]])
    stack = np.vstack([honest, [[1e9, -1e9]]])
    out = np.empty(2)
    Combination("median").combine(stack.copy(), out)
    assert out.tolist() == [2.5, -2.5]  # the middle two of four
    Combination("trimmed_mean", trim_fraction=0.25).combine(stack.copy(), out)
    assert out.tolist() == [2.5, -2.5]
    Combination("median").combine(np.vstack([honest[:2], [[1e9, -1e9]]]), out)
    assert out.tolist() == [2.0, -2.0]  # of three: the middle one


@pytest.mark.parametrize(
    ("method", "fraction", "needed"),
    [("mean", 0.2, 1), ("median", 0.2, 3), ("trimmed_mean", 0.2, 5), ("trimmed_mean", 1 / 3, 3),
     ("trimmed_mean", 0.1, 10), ("trimmed_mean", 0.45, 3)],
)  # fmt: skip
def test_robust_combinations_need_enough_selectors(
    method: str, fraction: float, needed: int
) -> None:
    combination = Combination(method, trim_fraction=fraction)
    assert combination.min_selectors == needed
    if method == "trimmed_mean":  # with the minimum, one value is dropped at each end
        assert combination.trimmed(needed) >= 1
        assert needed == 3 or combination.trimmed(needed - 1) == 0


def test_clip_factors_scale_each_mean_update_to_the_norm() -> None:
    clip = Combination(clip_norm=2.0)
    # ||A_s / N_s||: 10 / 5 = 2 (kept), 40 / 4 = 10 (scaled by 0.2), 0 (kept)
    assert clip.clip_factors([100.0, 1600.0, 0.0], [5, 4, 3]) == [1.0, 0.2, 1.0]
    assert Combination().clip_factors([1e30], [1]) == [1.0]  # off


def test_stop_when_parses_and_compares() -> None:
    condition = StopWhen.parse(" accuracy >= 0.95 ")
    assert str(condition) == "accuracy>=0.95"
    assert condition.met(RoundMetrics(3, (("accuracy", 0.95),)))
    assert not condition.met(RoundMetrics(3, (("accuracy", 0.94),)))
    assert not condition.met(RoundMetrics(3, (("loss", 0.1),)))  # a metric it lacks
    assert StopWhen.parse("loss<0.2").met(RoundMetrics(1, (("loss", 0.19),)))
    for bad in ("accuracy", "accuracy=0.9", ">=0.9", "accuracy>=nan", "acc uracy>=1", "a>=1e999"):
        with pytest.raises(ValueError):
            StopWhen.parse(bad)
    assert math.isfinite(StopWhen.parse("a>=1e300").threshold)
