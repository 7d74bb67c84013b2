"""The demo's data: scikit-learn's bundled digits, a held-out test set, non-IID client shards.

``load_digits`` ships inside scikit-learn (no download). The training part is
split over the clients with the usual Dirichlet label split: for each class,
proportions drawn from Dirichlet(alpha) decide how much of it each client
gets, so every client sees a skewed mix of labels (small alpha, more skew).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Split", "digits", "split_digits", "write_shards"]

#: Each client gets at least this many samples (the split is redrawn otherwise).
_MIN_SHARD = 20


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    shards: list[np.ndarray]  # indices into the training set, one array per client

    def label_counts(self) -> np.ndarray:
        """clients x classes matrix of sample counts (to show the skew)."""
        classes = int(self.y_train.max()) + 1
        return np.array([np.bincount(self.y_train[s], minlength=classes) for s in self.shards])


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def _dirichlet_shards(
    y: np.ndarray, clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split sample indices over ``clients`` with per-class Dirichlet(alpha) proportions."""
    if clients * _MIN_SHARD > len(y):
        raise ValueError(f"{len(y)} samples cannot give {clients} clients {_MIN_SHARD} each")
    while True:
        shards: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(members)).astype(int)[:-1]
            for shard, part in zip(shards, np.split(members, cuts), strict=True):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= _MIN_SHARD:
            return [rng.permutation(np.array(s, dtype=np.int64)) for s in shards]


def split_digits(clients: int, alpha: float = 0.5, seed: int = 0, test_size: float = 0.2) -> Split:
    from sklearn.model_selection import train_test_split

    x, y = digits()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=seed
    )
    shards = _dirichlet_shards(y_train, clients, alpha, np.random.default_rng(seed))
    return Split(x_train, y_train, x_test, y_test, shards)


def write_shards(split: Split, folder: Path) -> list[Path]:
    """One ``client<k>.npz`` (arrays x, y) per client: its local data."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, shard in enumerate(split.shards):
        path = folder / f"client{index}.npz"
        np.savez(path, x=split.x_train[shard], y=split.y_train[shard])
        paths.append(path)
    return paths
