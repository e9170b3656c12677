"""scikit-learn's bundled handwritten digits as a 32x32 image set (real data, 10 classes).

The 8x8 scans (0..16) are upsampled bilinearly to 32x32 and scaled to [-1, 1]; a stratified,
seeded split holds 20% out for the quality harness. scikit-learn ships the data, so nothing
is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 32
HOLDOUT_FRACTION = 0.2
SPLIT_SEED = 0
LABELS = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class DigitsSplit:
    train_images: Tensor  # (N, 1, 32, 32) in [-1, 1]
    train_labels: Tensor  # (N,) int64
    test_images: Tensor
    test_labels: Tensor


def upsample(images_8x8: np.ndarray) -> Tensor:
    """(N, 8, 8) values 0..16 -> (N, 1, 32, 32) float32 in [-1, 1]."""
    x = torch.from_numpy(images_8x8.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1


def load_digits_split() -> DigitsSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(data.target)),
        test_size=HOLDOUT_FRACTION,
        random_state=SPLIT_SEED,
        stratify=data.target,
    )
    images = upsample(data.images)
    labels = torch.from_numpy(data.target.astype(np.int64))
    return DigitsSplit(images[idx_train], labels[idx_train], images[idx_test], labels[idx_test])
