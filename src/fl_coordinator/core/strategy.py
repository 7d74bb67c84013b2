"""The server's strategy: how a round's updates become the new global weights. Pure numpy.

Each round the selectors send, per selector ``s``, the sum ``A_s`` of their
clients' weighted updates and the sum ``N_s`` of the weights. The
coordinator first combines them into ``D``, the round's mean update, per
weight array, in float64 (:class:`Combination`):

* ``mean`` (the default, the Go system's arithmetic): ``D = (sum_s A_s) / (sum_s N_s)``;
* ``median`` / ``trimmed_mean``: coordinate-wise over the selectors' mean
  updates ``A_s / N_s``, unweighted (a selector's ``N_s`` is its own claim);
* with ``clip_norm`` > 0, each ``A_s / N_s`` is first scaled down to that L2
  norm over all weight arrays (it is then ``c_s A_s / N_s``).

``D`` is an explicit intermediate (a buffer the caller owns), so a later
step can perturb it (client-level differential privacy adds noise to ``D``
before the optimizer sees it). Then the server's optimizer turns ``D`` into
the new weights (:class:`ServerOptimizer`; Reddi et al., *Adaptive
Federated Optimization*, ICLR 2021, Algorithm 2, without bias correction;
FedAvgM: Hsu et al., 2019)::

    fedavg      x = x + lr * D
    fedavgm     m = momentum * m + D;                  x = x + lr * m
    fedadagrad  m = b1 * m + (1 - b1) * D;  v = v + D^2
    fedadam     m = b1 * m + (1 - b1) * D;  v = b2 * v + (1 - b2) * D^2
    fedyogi     m = b1 * m + (1 - b1) * D;  v = v - (1 - b2) * D^2 * sign(v - D^2)
    (adaptive)  x = x + lr * m / (sqrt(v) + tau),      starting from m = 0, v = tau^2

Everything here works slab by slab on arrays the caller reads and writes:
no files, no clock, so every equation is tested against numpy directly.
numpy itself is imported by the two methods that compute: the configuration
checks the names declared here, and importing it stays light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .privacy import DifferentialPrivacy

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "COMBINATIONS",
    "DEFAULTS",
    "STRATEGIES",
    "Combination",
    "ServerOptimizer",
    "Strategy",
]

#: The optimizers, in the order of the README.
STRATEGIES = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")

#: How the selectors' updates are combined into ``D``.
COMBINATIONS = ("mean", "median", "trimmed_mean")

#: The server learning rate and ``tau`` of each strategy: the tuned values of Reddi et
#: al. (2021) for EMNIST character recognition, the task of theirs closest to ours
#: (handwritten digits and letters, a small network), as the authors' library lists
#: them (google-research/federated, optimization/docs/hyperparameters.md: 10^0, 10^-0.5,
#: 10^-1, 10^-2.5, 10^-2.5; tau 10^-2, 10^-4, 10^-4). FedAvg's 1.0 is the Go system's
#: arithmetic. ``None``: the strategy has no ``tau``.
DEFAULTS: dict[str, tuple[float, float | None]] = {
    "fedavg": (1.0, None),
    "fedavgm": (10**-0.5, None),
    "fedadagrad": (10**-1, 10**-2),
    "fedadam": (10**-2.5, 10**-4),
    "fedyogi": (10**-2.5, 10**-4),
}

_ADAPTIVE = ("fedadagrad", "fedadam", "fedyogi")


@dataclass(frozen=True)
class ServerOptimizer:
    """The server's update of the global weights ``x`` from ``D`` (see the module's docstring).

    ``momentum`` is FedAvgM's; ``beta_1``, ``beta_2`` and ``tau`` are the adaptive
    ones' (``tau`` also sets the initial ``v = tau^2``). Defaults: :data:`DEFAULTS`,
    ``momentum`` 0.9 (the paper's FedAvgM), ``beta_1`` 0.9 and ``beta_2`` 0.99 (the
    values the paper fixed for FedAdam and FedYogi).
    """

    name: str = "fedavg"
    learning_rate: float = 1.0
    momentum: float = 0.9
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.name!r}")

    @classmethod
    def of(
        cls,
        name: str,
        learning_rate: float | None = None,
        tau: float | None = None,
        **others: float,
    ) -> ServerOptimizer:
        """``name`` with :data:`DEFAULTS` for the learning rate and ``tau`` not given."""
        rate, default_tau = DEFAULTS[name]
        chosen_tau = tau if tau is not None else default_tau
        return cls(
            name,
            rate if learning_rate is None else learning_rate,
            tau=cls.tau if chosen_tau is None else chosen_tau,
            **others,
        )

    @property
    def adaptive(self) -> bool:
        return self.name in _ADAPTIVE

    @property
    def moments(self) -> tuple[str, ...]:
        """The state this optimizer keeps between rounds, each shaped like the weights."""
        return ("m", "v") if self.adaptive else ("m",) if self.name == "fedavgm" else ()

    def initial(self, moment: str) -> float:
        """The value every element of ``moment`` starts from: ``m = 0``, ``v = tau^2``."""
        return self.tau**2 if moment == "v" else 0.0

    @property
    def hyperparameters(self) -> dict[str, float]:
        """The values this strategy uses (for logs and the state file)."""
        values = {"learning_rate": self.learning_rate}
        if self.name == "fedavgm":
            values["momentum"] = self.momentum
        if self.adaptive:
            values.update(beta_1=self.beta_1, beta_2=self.beta_2, tau=self.tau)
        return values

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v:.6g}" for k, v in self.hyperparameters.items())
        return f"{self.name} ({shown})"

    def step(
        self,
        d: np.ndarray,
        x: np.ndarray,
        out: np.ndarray,
        m: np.ndarray | None = None,
        v: np.ndarray | None = None,
        scratch: np.ndarray | None = None,
    ) -> None:
        """Write the new weights into ``out`` (its own dtype) from ``D`` and the current ``x``.

        ``d``, ``m``, ``v`` and ``scratch`` are float arrays of the accumulator's
        dtype, shaped like ``x``; ``d`` is used as work space (its values are
        lost), ``m`` and ``v`` (as :attr:`moments` needs) are updated in place,
        ``scratch`` is work space for the adaptive ones. Each equation is one
        numpy ufunc per term into preallocated arrays: no allocation per slab.
        With fedavg and a learning rate of 1 this is ``out = x + D``, cast once:
        exactly the Go system's arithmetic.
        """
        import numpy as np

        if self.name == "fedavg":
            if self.learning_rate != 1.0:
                d *= self.learning_rate
            np.add(d, x, out=out, casting="same_kind")
            return
        assert m is not None
        if self.name == "fedavgm":
            m *= self.momentum
            m += d
            np.multiply(m, self.learning_rate, out=d)
            np.add(d, x, out=out, casting="same_kind")
            return
        assert v is not None and scratch is not None
        square = np.multiply(d, d, out=scratch)  # D^2
        m *= self.beta_1
        d *= 1 - self.beta_1
        m += d
        if self.name == "fedadagrad":
            v += square
        elif self.name == "fedadam":
            v *= self.beta_2
            square *= 1 - self.beta_2
            v += square
        else:  # fedyogi
            sign = np.subtract(v, square, out=d)
            np.sign(sign, out=sign)
            square *= sign
            square *= 1 - self.beta_2
            v -= square
        step = np.sqrt(v, out=d)
        step += self.tau
        np.divide(np.multiply(m, self.learning_rate, out=scratch), step, out=step)
        np.add(step, x, out=out, casting="same_kind")


@dataclass(frozen=True)
class Combination:
    """How the selectors' updates become ``D``: ``method``, ``trim_fraction``, ``clip_norm``.

    ``median`` and ``trimmed_mean`` are unweighted: a selector's weight ``N_s``
    is a number it writes itself, so a weighted statistic would let one
    selector that claims a huge ``N_s`` decide the result; unweighted, one bad
    selector among three or more is outvoted coordinate by coordinate. The
    trimmed mean drops ``floor(trim_fraction * K)`` of the K values at each end
    (as ``scipy.stats.trim_mean`` does) and averages the rest; with nothing to
    drop it would be the plain mean, so a round needs :attr:`min_selectors`.
    """

    method: str = "mean"
    trim_fraction: float = 0.2
    clip_norm: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in COMBINATIONS:
            raise ValueError(f"unknown combination {self.method!r}")
        if not 0 < self.trim_fraction < 0.5:
            raise ValueError(f"trim fraction must be in (0, 0.5), got {self.trim_fraction}")

    @property
    def robust(self) -> bool:
        return self.method != "mean"

    def trimmed(self, selectors: int) -> int:
        """Values dropped at each end, of ``selectors`` of them."""
        return math.floor(self.trim_fraction * selectors + 1e-9)

    @property
    def min_selectors(self) -> int:
        """Selectors with usable updates a round needs: 3 for a median (of 2 it is their
        mean), and for a trimmed mean enough that one value is dropped at each end."""
        if self.method == "median":
            return 3
        if self.method == "trimmed_mean":
            return max(3, math.ceil(1 / self.trim_fraction - 1e-9))
        return 1

    def clip_factors(self, square_norms: Sequence[float], weights: Sequence[int]) -> list[float]:
        """``c_s = min(1, clip_norm / ||A_s / N_s||)`` for each selector (1 without clipping).

        ``square_norms`` are ``||A_s||^2`` over all weight arrays.
        """
        if not self.clip_norm:
            return [1.0] * len(weights)
        factors = []
        for square, weight in zip(square_norms, weights, strict=True):
            norm = math.sqrt(square) / weight
            factors.append(min(1.0, self.clip_norm / norm) if norm > 0 else 1.0)
        return factors

    def combine(self, stack: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``D`` into ``out`` from ``stack`` (K selectors' mean updates along axis 0).

        ``stack`` is sorted in place. Only for :attr:`robust` combinations.
        """
        import numpy as np

        selectors = stack.shape[0]
        stack.sort(axis=0)
        if self.method == "median":
            middle = selectors // 2
            if selectors % 2:
                out[...] = stack[middle]
            else:
                np.add(stack[middle - 1], stack[middle], out=out)
                out *= 0.5
            return out
        cut = self.trimmed(selectors)
        kept = stack[cut : selectors - cut]
        np.sum(kept, axis=0, out=out)
        out /= kept.shape[0]
        return out

    def describe(self) -> str:
        parts = [self.method]
        if self.method == "trimmed_mean":
            parts.append(f"trim_fraction={self.trim_fraction:g}")
        if self.clip_norm:
            parts.append(f"clip_norm={self.clip_norm:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Strategy:
    """The whole of what a round's aggregation computes: combination, then optimizer.

    With ``privacy`` (client-level DP, :mod:`.privacy`) the combination is the
    noised sum over the fixed denominator, ``D = (sum_s A_s + N(0, (z C)^2 I)) /
    CHECKIN_LIMIT``, and needs the plain ``mean`` without clipping of selectors:
    a robust statistic or a clip per selector would change the sensitivity the
    noise is calibrated to.
    """

    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    combination: Combination = field(default_factory=Combination)
    privacy: DifferentialPrivacy | None = None

    def __post_init__(self) -> None:
        if self.privacy is not None and (self.combination.robust or self.combination.clip_norm):
            raise ValueError("differential privacy needs the plain mean, without clipping")

    def describe(self) -> str:
        shown = f"{self.optimizer.describe()}, combining by {self.combination.describe()}"
        return shown if self.privacy is None else f"{shown}, {self.privacy.describe()}"
