"""Where a sampling run's randomness comes from.

The sampler never touches a global RNG. It asks a `Randomness` object for the generation
orders and, each step, for the diffusion noise of the tokens being predicted:

* `RequestRandomness`: one `torch.Generator` per request, seeded from the request's seed. Each
  request draws only from its own generator, so its image depends on (model, class, seed,
  parameters), not on which other requests share its batch.
* `ReplayRandomness` (in tests): replays orders and noise recorded from the official code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor


class Randomness(Protocol):
    def orders(self) -> Tensor:
        """(B, L) int64 permutations; the tail of each order is generated first."""
        ...

    def noise(self, step: int, pred_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Noise for the tokens predicted this step.

        pred_idx (B, k): positions being predicted. Returns x_T (B, k, C), the initial
        diffusion noise, and step_noise (T, B, k, C), the per-diffusion-step noise in call
        order (entry j belongs to diffusion index T-1-j).
        """
        ...

    def select(self, rows: Tensor) -> None:
        """Keep only these rows (requests retired mid-run leave the batch)."""
        ...


class RequestRandomness:
    """Per-request generators on the sampling device."""

    def __init__(
        self,
        seeds: Sequence[int],
        seq_len: int,
        token_dim: int,
        diffusion_steps: int,
        device: torch.device | str,
    ) -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        self.seq_len, self.token_dim, self.diffusion_steps = seq_len, token_dim, diffusion_steps

    def orders(self) -> Tensor:
        return torch.stack(
            [torch.randperm(self.seq_len, generator=g, device=self.device) for g in self.generators]
        )

    def noise(self, step: int, pred_idx: Tensor) -> tuple[Tensor, Tensor]:
        k = pred_idx.shape[1]
        shape = (1 + self.diffusion_steps, k, self.token_dim)
        draws = torch.stack(  # (B, 1 + T, k, C): one draw per request and step
            [torch.randn(shape, generator=g, device=self.device) for g in self.generators]
        )
        return draws[:, 0], draws[:, 1:].transpose(0, 1)

    def select(self, rows: Tensor) -> None:
        self.generators = [self.generators[i] for i in rows.tolist()]
