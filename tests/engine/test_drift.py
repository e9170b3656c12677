"""The Fréchet noise tools: a spread that matches the seeds' own, and a two-sample test that
holds its level on one distribution and rejects a shifted one."""

from __future__ import annotations

import numpy as np
import pytest

from engine.eval.drift import drift_test, frechet_spread
from engine.eval.quality import frechet_distance

D = 8


def _sample(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    x = rng.standard_normal((n, D))
    x[:, 0] += shift
    return x


def test_identical_sets_are_no_drift_at_all():
    x = _sample(np.random.default_rng(0), 200)
    distance, p, null_95 = drift_test(x, x, permutations=50)
    assert distance == pytest.approx(0.0, abs=1e-6) and p == 1.0 and null_95 == pytest.approx(0)


def test_the_test_holds_its_level_on_one_distribution():
    ps = [
        drift_test(_sample(np.random.default_rng(s), 300),
                   _sample(np.random.default_rng(100 + s), 300), permutations=60, seed=s)[1]
        for s in range(20)
    ]  # fmt: skip
    assert sum(p <= 0.05 for p in ps) <= 3  # level 5%: P(more than 3 of 20) < 2%
    assert 0.25 < float(np.mean(ps)) < 0.75  # roughly uniform


def test_the_test_rejects_a_shift_of_0_15_standard_deviations_at_n_2000():
    rng = np.random.default_rng(1)
    a, b = _sample(rng, 2000, shift=0.15), _sample(rng, 2000)
    distance, p, null_95 = drift_test(a, b, permutations=100)
    assert distance > null_95 > 0.0 and p < 0.02


def test_paired_sets_must_align():
    with pytest.raises(ValueError, match="one shape"):
        drift_test(np.zeros((10, D)), np.zeros((9, D)))


def test_the_half_sample_spread_is_about_the_whole_samples_own_spread():
    real = _sample(np.random.default_rng(7), 400)
    labels = np.arange(400) % 4
    draws = [frechet_distance(_sample(np.random.default_rng(s), 400, 0.3), real) for s in range(40)]
    spread = frechet_spread(_sample(np.random.default_rng(99), 400, 0.3), labels, real)
    assert 0.5 < spread / float(np.std(draws)) < 2.0


def test_a_spread_needs_four_images_a_class():
    with pytest.raises(ValueError, match="at least 4"):
        frechet_spread(np.zeros((30, D)), np.arange(30) % 10, np.zeros((30, D)))
