"""The numpy split and digits reader draw exactly what scikit-learn does (recorded runs keep their
splits), and the driver's path to the first step imports neither scikit-learn nor SciPy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split as sk_split

from emergence_ray.data.sources import load_digits as our_digits
from emergence_ray.data.sources import split_indices
from emergence_ray.data.split import train_test_split


def _cases():
    rng = np.random.default_rng(0)
    for case in range(60):
        n = int(rng.integers(20, 3000))
        classes = int(rng.integers(2, 12))
        fraction = float(rng.choice([0.05, 0.1, 0.15, 0.2, 1 / 3, 0.5, float(rng.uniform(0.02, 0.6))]))
        skew = rng.dirichlet(np.ones(classes) * (0.5 if case % 3 == 0 else 5.0))
        labels = rng.choice(classes, size=n, p=skew)
        yield n, labels, fraction, int(rng.integers(0, 10_000))


@pytest.mark.parametrize("stratified", [False, True], ids=["plain", "stratified"])
def test_split_matches_scikit_learn_index_for_index(stratified):
    compared = 0
    for n, labels, fraction, seed in _cases():
        indices = np.arange(n) * 3 + 7  # a subset's own indices, not 0..n-1
        stratify = labels if stratified else None
        try:
            want = sk_split(indices, test_size=fraction, random_state=seed, stratify=stratify)
        except ValueError:  # a class too small to stratify: ours must refuse it too
            with pytest.raises(ValueError):
                train_test_split(indices, fraction, seed, stratify)
            continue
        got = train_test_split(indices, fraction, seed, stratify)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), (n, fraction, seed)
        compared += 1
    assert compared >= 40


def test_split_indices_of_the_digits_are_unchanged():
    """The seeded three-way split of the digits (the README's main job), recomputed with
    scikit-learn's splitter in split_indices' own steps."""
    _, target = our_digits()
    ours = split_indices(target, 0.1, 0.1, seed=0)
    idx = np.arange(len(target))
    rest, test = sk_split(idx, test_size=0.1, random_state=0, stratify=target)
    rest, test = np.sort(rest), np.sort(test)
    train, val = sk_split(rest, test_size=0.1 / 0.9, random_state=1, stratify=target[rest])
    assert np.array_equal(ours["test"], test) and np.array_equal(ours["val"], np.sort(val))
    assert np.array_equal(np.sort(ours["train"]), np.sort(train))


def test_digits_reader_matches_load_digits():
    d = load_digits()
    images, target = our_digits()
    assert images.shape == (1797, 8, 8) and np.array_equal(images, d.images)
    assert np.array_equal(target, d.target)


def test_driver_path_imports_no_scikit_learn():
    """The CLI, the trainer and the digits source's splits, in a fresh interpreter: scikit-learn
    (and SciPy, which it pulls in) stay unimported until the report after training."""
    code = ("import sys, emergence_ray.cli, emergence_ray.trainer\n"
            "from emergence_ray.config import DataConfig\n"
            "from emergence_ray.data import pipeline\n"
            "raw = pipeline.load_raw(DataConfig())\n"
            "assert raw.train.count > 1000\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
