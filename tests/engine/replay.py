"""Replaying the randomness recorded from the official `sample_tokens` run."""

from __future__ import annotations

import torch
from torch import Tensor


class ReplayRandomness:
    """Serves recorded orders and per-step noise to our sampler.

    The official code lays each step's noise rows out in (batch, ascending position) order and
    draws the initial noise for the conditional rows only; we ask for noise in each row's
    generation order, so rows are mapped through the rank of each position.
    """

    def __init__(self, trace: dict[str, Tensor], num_rows: int) -> None:
        self.trace, self.num_rows = trace, num_rows

    def orders(self) -> Tensor:
        return self.trace["orders"]

    def noise(self, step: int, pred_idx: Tensor) -> tuple[Tensor, Tensor]:
        bsz, k = pred_idx.shape
        rank = pred_idx.argsort(dim=1).argsort(dim=1)  # rank of each position in its row
        rows = (torch.arange(bsz)[:, None] * k + rank).flatten()  # recorded row per token
        init = self.trace[f"step{step}.init_noise"]  # (B*k, C)
        step_noise = self.trace[f"step{step}.step_noise"][:, : bsz * k]  # conditional half
        return init[rows].view(bsz, k, -1), step_noise[:, rows].view(len(step_noise), bsz, k, -1)
