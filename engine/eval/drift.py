"""How far a Fréchet distance can be trusted, and whether a mode's images drift from MAR's.

On the digits harness a Fréchet distance of 500-1,000 generated images moves by ~10% with the
seeds alone (docs/ENGINE.md, "GtR": how noisy the harness is), so a row's point estimate cannot
tell +3% from +0%. Two tools make the comparison honest:

* `frechet_spread`: the standard deviation of a row's Fréchet distance, from class-balanced
  half-samples drawn without replacement. The variance of a mean-like statistic over n/2 of n
  draws without replacement is var(n/2) x (1 - 1/2) = var(n): the half-samples' spread is
  about the whole sample's (their mean sits higher, Fréchet's small-sample bias).
* `drift_test`: a two-sample test between a mode's images and MAR's on the same labels and
  seeds. The statistic is the Fréchet distance between the two generated sets; the null is
  built by swapping each seed's pair (MAR's image, the mode's image) with probability 1/2,
  which is exchangeable when the mode draws from MAR's distribution. p is the share of swaps
  at least as far apart as the observed sets (with the observed one counted, so p > 0).
  Its power depends on the pairing: a mode whose images follow MAR's closely on each seed
  (turbo: PSNR ~20 dB) has a narrow null, one that draws other samples of the class (GtR:
  ~16 dB) a wide one, so `null_95`, the distance the test would flag at 5%, goes with p.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from engine.eval.quality import frechet_distance


def frechet_spread(
    feats: np.ndarray, labels: np.ndarray, real: np.ndarray, draws: int = 40, seed: int = 0
) -> float:
    """Standard deviation of the Fréchet distance to `real` over class-balanced half-samples
    of `feats` (n, d) with `labels` (n,): about the standard error of the whole sample's."""
    feats, labels = np.asarray(feats, dtype=np.float64), np.asarray(labels)
    rng = np.random.default_rng(seed)
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    if any(len(idx) < 4 for idx in per_class):
        raise ValueError("each class needs at least 4 images to be halved")
    values = []
    for _ in range(draws):
        half = np.concatenate([rng.permutation(idx)[: len(idx) // 2] for idx in per_class])
        values.append(frechet_distance(feats[half], real))
    return float(np.std(values))


class Drift(NamedTuple):
    frechet: float  # between the mode's images and MAR's
    p: float  # permutation p-value: how often a swap of pairs lies at least as far apart
    null_95: float  # the 95th percentile of the swapped distances: what the test flags at 5%


def drift_test(
    feats: np.ndarray, reference: np.ndarray, permutations: int = 200, seed: int = 0
) -> Drift:
    """The Fréchet distance between `feats` and `reference`, its p-value and null's 95th
    percentile. Row i of both (n, d) arrays must be the same label and seed (a mode's image
    and MAR's); each permutation swaps a random subset of those pairs between the sets."""
    a, b = np.asarray(feats, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired feature sets must have one shape, got {a.shape}, {b.shape}")
    observed = frechet_distance(a, b)
    rng = np.random.default_rng(seed)
    null = []
    for _ in range(permutations):
        swap = rng.random(len(a)) < 0.5
        null.append(frechet_distance(np.where(swap[:, None], b, a), np.where(swap[:, None], a, b)))
    at_least = 1 + sum(d >= observed for d in null)  # the observed assignment counts as one
    return Drift(observed, at_least / (permutations + 1), float(np.quantile(null, 0.95)))
