"""Replaying the randomness recorded from the official `sample_tokens` run."""

from __future__ import annotations

from torch import Tensor


class ReplayRow:
    """Serves one image's recorded order and per-step noise to our engine.

    The official code lays each step's noise rows out in (batch, ascending position) order and
    draws the initial noise for the conditional rows only; we ask for noise in the image's
    generation order, so tokens are mapped through the rank of each position.
    """

    def __init__(self, trace: dict[str, Tensor], row: int) -> None:
        self.trace, self.row = trace, row

    def order(self) -> Tensor:
        return self.trace["orders"][self.row]

    def noise(self, step: int, pred_idx: Tensor) -> tuple[Tensor, Tensor]:
        k = len(pred_idx)
        rank = pred_idx.argsort().argsort()  # rank of each position in its row
        rows = self.row * k + rank  # recorded row per token
        init = self.trace[f"step{step}.init_noise"]  # (B*k, C)
        step_noise = self.trace[f"step{step}.step_noise"]  # (T, 2B*k, C): conditional half first
        return init[rows], step_noise[:, rows]


def replay_randomness(trace: dict[str, Tensor], num_rows: int) -> list[ReplayRow]:
    return [ReplayRow(trace, r) for r in range(num_rows)]
