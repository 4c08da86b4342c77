"""Seeded held-out splits in numpy: the same draws as scikit-learn's
`train_test_split(indices, test_size=fraction, random_state=seed[, stratify=labels])`
(ShuffleSplit / StratifiedShuffleSplit, scikit-learn 1.x), index for index, so the splits of
recorded runs do not move. scikit-learn is not imported on the way to the first training step:
with SciPy it costs ~1.2 s of the driver's CPU there (`benchmarks/FIRST_STEP.md`).
`tests/test_split.py` checks this against scikit-learn on many cases.
"""

from __future__ import annotations

from math import ceil

import numpy as np


def train_test_split(indices: np.ndarray, test_size: float, seed: int,
                     stratify: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (kept, held out) subsets of `indices`; `test_size` a fraction in (0, 1), the held-out
    count rounded up."""
    n = len(indices)
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size={test_size}: a fraction in (0, 1) is expected")
    n_test = ceil(test_size * n)
    n_train = n - n_test
    if n_train == 0:
        raise ValueError(f"test_size={test_size} of {n} samples leaves nothing to train on")
    rng = np.random.RandomState(seed)
    if stratify is None:
        order = rng.permutation(n)
        return indices[order[n_test:]], indices[order[:n_test]]
    train, test = _stratified(np.asarray(stratify), n_train, n_test, rng)
    return indices[train], indices[test]


def _stratified(y: np.ndarray, n_train: int, n_test: int,
                rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """StratifiedShuffleSplit's first split: per class, the most likely counts of a draw without
    replacement (ties broken at random), then a permutation of each class's members."""
    _, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    if class_counts.min() < 2:
        raise ValueError("stratify: every class needs at least 2 members")
    if min(n_train, n_test) < len(class_counts):
        raise ValueError(f"stratify: {n_train} kept and {n_test} held out cannot both hold "
                         f"each of {len(class_counts)} classes")
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, members in enumerate(class_indices):
        permuted = members.take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(permuted[:n_i[i]])
        test.extend(permuted[n_i[i]:n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Approximate mode of the multivariate hypergeometric: the floored proportional counts, the
    remainder handed out by descending fractional part, ties drawn from `rng`."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            take = min(len(inds), need)
            floored[rng.choice(inds, size=take, replace=False)] += 1
            need -= take
            if need == 0:
                break
    return floored.astype(int)
