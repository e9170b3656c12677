"""Generation then Reconstruction (GtR, arXiv 2510.17171) and frequency-weighted token
selection (FTS): two decoding knobs, each exact when off.

* **Two-stage order** (`GtrConfig`). The token grid splits as a checkerboard. The *structure*
  half ((i + j) even) is generated first, slowly: over `structure_share` of the request's
  steps, with MAR's cosine schedule over that half. The *reconstruction* half, every token of
  which has its four neighbours known by then, is completed in `reconstruction_steps` steps.
  Neighbouring tokens change most once a token is decoded, so no two neighbours are ever
  generated in the same step. A run takes `S + K` steps instead of `num_iter`. The generation
  order is the image's own random permutation (drawn as always, so its generator's stream is
  unchanged), stably partitioned: each half keeps its random order.
* **FTS** (`FtsConfig`). Within a step, the predicted tokens whose neighbourhood carries the
  most high-frequency energy get more diffusion-head steps and the rest fewer, at an equal
  or lower total. Our energy (GtR's own measure was not available to us): at an unknown
  position, the variance of its known 4-neighbours' tokens, a token-space high-pass that is
  large across an edge and zero on a flat region. It needs known neighbours, so FTS applies
  to the reconstruction stage under GtR and to every step after the first without it.

The schedules are plain functions (`two_stage_plan`), pinned by table tests; the step engine
(`step.py`) reads the config per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.decode.schedules import Step, mask_len


@dataclass(frozen=True)
class GtrConfig:
    """The two-stage order: S = max(1, round(num_iter * structure_share)) steps for the
    structure half, then K = `reconstruction_steps` for the rest."""

    structure_share: float = 0.25
    reconstruction_steps: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.structure_share <= 1.0 or self.reconstruction_steps < 1:
            raise ValueError("GtR needs 0 < structure_share <= 1 and reconstruction_steps >= 1")

    def structure_steps(self, num_iter: int) -> int:
        return max(1, round(num_iter * self.structure_share))


@dataclass(frozen=True)
class FtsConfig:
    """The `share` of a step's tokens with the most high-frequency energy run the head with
    `high` x its steps, the others with `low` x; share * high + (1 - share) * low <= 1."""

    share: float = 0.25
    high: float = 1.0
    low: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.share < 1.0 or self.low <= 0.0 or self.high < self.low:
            raise ValueError("FTS needs 0 < share < 1 and 0 < low <= high")
        if self.share * self.high + (1.0 - self.share) * self.low > 1.0 + 1e-9:
            raise ValueError("FTS may move head steps, not add them: share*high + (1-share)*low")

    def high_count(self, num_tokens: int) -> int:
        """Tokens of a step of `num_tokens` that get the `high` steps (rounded down, as the
        head's step counts are, so a step's total never exceeds its unweighted one)."""
        return math.floor(self.share * num_tokens)


def structure_mask(seq_len: int, device: torch.device | str | None = None) -> Tensor:
    """(L,) bool: the checkerboard half generated first, (i + j) even on the square grid."""
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"GtR needs a square token grid, not {seq_len} tokens")
    i = torch.arange(side, device=device)
    return ((i[:, None] + i[None, :]) % 2 == 0).flatten()


def two_stage_order(order: Tensor, structure: Tensor) -> Tensor:
    """The permutation `order` (L,) with the structure positions moved to its tail (the tail
    is generated first), each half in its original relative order. A stable sort, so no
    host sync."""
    key = structure[order].to(torch.int8)  # 0: reconstruction (head), 1: structure (tail)
    return order[torch.sort(key, stable=True).indices]


def two_stage_plan(num_iter: int, seq_len: int, config: GtrConfig) -> list:
    """Every step of a two-stage run: `Step`s over the structure half (stage 0) with MAR's
    clamped cosine schedule over its tokens, then the reconstruction half (stage 1) the same
    way over K steps. `mask_len` counts every token still unknown after the step (it drives
    linear guidance); the last step predicts the rest."""
    num_structure = seq_len - seq_len // 2  # (i + j) even: the larger half of an odd grid
    stages = (
        (num_structure, config.structure_steps(num_iter)),
        (seq_len - num_structure, config.reconstruction_steps),
    )
    steps, unknown = [], seq_len
    for stage, (count, num_steps) in enumerate(stages):
        left = count
        for s in range(num_steps):
            last = s == num_steps - 1
            m = 0 if last else mask_len(s, num_steps, count, left)
            later = unknown - left  # tokens of the stages after this one
            steps.append(Step(len(steps), unknown, m + later, left - m, stage))
            unknown, left = unknown - (left - m), m
    return steps


def high_frequency_energy(tokens: Tensor, known: Tensor) -> Tensor:
    """(L,) energy per position: the variance of its known 4-neighbours' tokens (0 with
    fewer than two). tokens (L, C) on a square grid; known (L,) bool."""
    seq_len, dim = tokens.shape
    side = math.isqrt(seq_len)
    k = known.to(tokens.dtype).view(1, side, side)
    t = (tokens * k.view(seq_len, 1)).T.reshape(dim, side, side)
    sq = (t * t).sum(0, keepdim=True)

    def neighbours(x: Tensor) -> Tensor:  # (c, side, side): sum over the 4 neighbours
        p = F.pad(x, (1, 1, 1, 1))
        return p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]

    count, total, total_sq = neighbours(k)[0], neighbours(t), neighbours(sq)[0]
    mean = total / count.clamp(min=1)
    energy = total_sq / count.clamp(min=1) - (mean * mean).sum(0)
    return torch.where(count >= 2, energy.clamp(min=0), torch.zeros_like(energy)).flatten()


def fts_split(energy: Tensor, pred: Tensor, num_high: int) -> tuple[Tensor, Tensor]:
    """Local indices into pred (k,): the `num_high` of highest energy, then the rest (both by
    energy, highest first; ties in pred's order)."""
    rank = energy[pred].argsort(descending=True, stable=True)
    return rank[:num_high], rank[num_high:]
