"""Where an image's randomness comes from.

The engine never touches a global RNG. Each image in flight has a `RowRandomness` that gives
its generation order once, at admission, and each step the diffusion noise of the tokens it
predicts:

* `SeededRandomness`: one `torch.Generator` per image, seeded from the request's seed. An image
  draws only from its own generator, so it depends on (model, class, seed, parameters), not on
  which other images share its batch or when it joined;
* `ReplayRandomness` (in tests): replays orders and noise recorded from the official code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor


class RowRandomness(Protocol):
    def order(self) -> Tensor:
        """(L,) int64 permutation; its tail is generated first."""
        ...

    def noise(self, step: int, pred_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Noise for the tokens predicted at `step`.

        pred_idx (k,): positions being predicted. Returns x_T (k, C), the initial diffusion
        noise, and step_noise (T, k, C), the per-diffusion-step noise in call order (entry j
        belongs to diffusion index T-1-j).
        """
        ...


class SeededRandomness:
    """One image's generator on the sampling device: the order first, then one draw of
    (1 + T, k, C) per step."""

    def __init__(
        self, seed: int, seq_len: int, token_dim: int, diffusion_steps: int, device
    ) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(int(seed))
        self.seq_len, self.token_dim, self.diffusion_steps = seq_len, token_dim, diffusion_steps

    def order(self) -> Tensor:
        return torch.randperm(self.seq_len, generator=self.generator, device=self.device)

    def noise(self, step: int, pred_idx: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1 + self.diffusion_steps, len(pred_idx), self.token_dim)
        draw = torch.randn(shape, generator=self.generator, device=self.device)
        return draw[0], draw[1:]


def request_randomness(
    seeds: Sequence[int], seq_len: int, token_dim: int, diffusion_steps: int, device
) -> list[SeededRandomness]:
    """One `SeededRandomness` per image."""
    return [SeededRandomness(s, seq_len, token_dim, diffusion_steps, device) for s in seeds]
