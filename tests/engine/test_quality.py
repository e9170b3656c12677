"""The quality harness: exact metric formulas, a strong judge, and metrics that can fail."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from engine.eval.quality import (
    DigitClassifier,
    QualityReport,
    classifier_accuracy,
    default_split,
    diversity,
    evaluate,
    frechet_distance,
    get_classifier,
    quantize,
    train_classifier,
)
from engine.train.digits import DigitsSplit


def gaussian_samples(rng: np.random.Generator, mean: np.ndarray, cov: np.ndarray, n: int):
    """Samples whose sample mean and (ddof=1) covariance are exactly `mean` and `cov`."""
    d = len(mean)
    z = rng.standard_normal((n, d))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # cov(z) == I
    return z @ np.linalg.cholesky(cov).T + mean


# ---------------------------------------------------------------- Fréchet distance, diversity


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((300, 16))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_mean_shift_only_is_squared_shift():
    rng = np.random.default_rng(1)
    d = 8
    a_mat = rng.standard_normal((d, d))
    cov = a_mat @ a_mat.T + 0.5 * np.eye(d)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    a = gaussian_samples(rng, mu_a, cov, 400)
    b = gaussian_samples(rng, mu_b, cov, 300)
    expected = float(((mu_a - mu_b) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_diagonal_covariances_match_closed_form():
    rng = np.random.default_rng(2)
    d = 6
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d) + 1.0
    var_a, var_b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    a = gaussian_samples(rng, mu_a, np.diag(var_a), 500)
    b = gaussian_samples(rng, mu_b, np.diag(var_b), 500)
    expected = float(((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    # Invariant under a common rotation (non-diagonal, non-commuting-free check of sqrtm).
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    assert frechet_distance(a @ q, b @ q) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((200, 10))
    b = rng.standard_normal((200, 10)) + 0.5
    a[:, :3] = 0.0  # dead features, as ReLU units give
    b[:, :3] = 0.0
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value > 0


def test_diversity_is_zero_for_identical_samples_and_grows_with_spread():
    labels = np.repeat(np.arange(3), 20)
    base = np.random.default_rng(4).standard_normal((3, 5))[labels]
    assert diversity(base, labels) == 0.0
    noise = np.random.default_rng(5).standard_normal(base.shape)
    small, large = diversity(base + 0.1 * noise, labels), diversity(base + 1.0 * noise, labels)
    assert 0 < small < large
    assert large == pytest.approx(10 * small, rel=1e-9)  # distances scale linearly


def test_diversity_skips_singleton_classes():
    feats = np.array([[0.0], [3.0], [100.0]])
    assert diversity(feats, np.array([0, 0, 1])) == pytest.approx(3.0)


def test_quantize_matches_png_round_trip():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.3, 1.0, 2.0])
    q = quantize(x)
    expected = np.round((np.clip(x.numpy(), -1, 1) + 1) / 2 * 255) / 255 * 2 - 1
    np.testing.assert_allclose(q.numpy(), expected, atol=1e-6)


# ---------------------------------------------------------------- the judge and the harness


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return default_split()


@pytest.fixture(scope="module")
def classifier(split: DigitsSplit) -> DigitClassifier:
    return get_classifier(0)  # trained once per process, shared with evaluate's default path


def test_train_classifier_is_deterministic_and_leaves_global_rng_alone(split: DigitsSplit):
    small = DigitsSplit(
        split.train_images[:128], split.train_labels[:128], split.test_images, split.test_labels
    )
    torch.manual_seed(123)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    m1 = train_classifier(small, seed=7, epochs=1)
    m2 = train_classifier(small, seed=7, epochs=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k


def test_classifier_generalises_to_held_out_real_digits(split, classifier):
    assert classifier_accuracy(classifier, split.test_images, split.test_labels) >= 0.97
    x = split.test_images[:4]
    assert classifier(x).shape == (4, 10)
    assert classifier.features(x).shape[0] == 4 and classifier.features(x).ndim == 2


def held_out_generator(split: DigitsSplit):
    """A 'generator' that returns distinct held-out real digits of the requested class."""
    by_class = [split.test_images[split.test_labels == c] for c in range(10)]

    def generate(labels: Tensor, seeds: list[int]) -> Tensor:
        pairs = zip(labels.tolist(), seeds, strict=True)
        return torch.stack([by_class[c][(s // 10) % len(by_class[c])] for c, s in pairs])

    return generate


def test_evaluate_on_real_held_out_digits_passes(split, classifier):
    calls: list[tuple[int, int]] = []
    report = evaluate(
        held_out_generator(split),
        num=360,
        batch_size=100,
        split=split,
        classifier=classifier,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert isinstance(report, QualityReport)
    assert calls == [(100, 360), (200, 360), (300, 360), (360, 360)]
    assert report.num_images == 360
    assert sorted(report.per_class_accuracy) == [str(i) for i in range(10)]
    assert report.classifier_test_accuracy >= 0.97
    assert report.accuracy >= 0.95
    assert report.frechet_distance_real > 0
    assert report.frechet_distance <= 3.0 * report.frechet_distance_real
    assert 0.8 <= report.diversity_ratio <= 1.2
    assert set(report.to_dict()) >= {"accuracy", "frechet_distance", "diversity_ratio", "seconds"}


def test_evaluate_flags_mode_collapse(split, classifier):
    fixed = torch.stack([split.test_images[split.test_labels == c][0] for c in range(10)])

    def generate(labels: Tensor, seeds: list[int]) -> Tensor:
        return fixed[labels]

    report = evaluate(generate, num=200, batch_size=100, split=split, classifier=classifier)
    assert report.accuracy >= 0.9  # still recognisable ...
    assert report.diversity_ratio < 0.1  # ... but no diversity at all


def test_evaluate_flags_noise(split, classifier):
    def generate(labels: Tensor, seeds: list[int]) -> Tensor:
        out = [
            torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in seeds
        ]
        return torch.stack(out)

    report = evaluate(generate, num=200, batch_size=100, split=split, classifier=classifier)
    assert report.accuracy < 0.5 or report.frechet_distance >= 10 * report.frechet_distance_real
    assert report.frechet_distance >= 10 * report.frechet_distance_real


def test_evaluate_rejects_wrong_shapes(split, classifier):
    with pytest.raises(ValueError, match="shape"):
        evaluate(
            lambda labels, seeds: torch.zeros(len(seeds), 1, 8, 8),
            num=10,
            split=split,
            classifier=classifier,
        )


def test_evaluate_defaults_use_the_cached_classifier(classifier):
    assert get_classifier(0) is classifier
    report = evaluate(lambda labels, seeds: torch.full((len(seeds), 1, 32, 32), -1.0), num=20)
    assert report.num_images == 20 and report.classifier_test_accuracy >= 0.97
    assert report.diversity_ratio == 0.0


def test_psnr_table():
    from engine.eval.quality import psnr

    a = torch.full((2, 1, 4, 4), -1.0)
    b = a.clone()
    b[1, 0, 0, 0] = 1.0  # one pixel 0 -> 255 out of 16: MSE = 255^2 / 16
    db = psnr(b, a)
    assert db[0].item() == 100.0  # identical images
    assert abs(db[1].item() - 10 * math.log10(16)) < 1e-4
