"""The diffusion head's decoding policy: how many DDPM steps each AR step gets, and which of
those steps run the whole MLP (the loop itself: `passes/head.py`).

Two knobs, both exact when off (`HeadConfig()` is upstream's sampler, bit for bit):

* **step schedule** (DiSA, arXiv 2505.20297): the number of DDPM steps T as a function of AR
  progress, annealed from `upper` at the first AR step to `lower` at the last, `linear`
  (DiSA's rule: T = lower + int((N-1-s)/(N-1) * (upper-lower))) or `cosine`. Annealed counts are
  respaced evenly over base timesteps [0, clip]: DiSA clips at 950 because the last base steps of
  the cosine schedule have alpha_bar ~ 1e-9, where the first DDPM step multiplies the head's eps
  error by 1/sqrt(alpha_bar) (our digits head needed the same: see docs/ENGINE.md);
* **head cache** (LazyMAR's `CachedDiffLoss`, arXiv 2503.12450): the MLP runs in full only on
  every `cache_period`-th diffusion step and on the noisiest `cache_full_fraction` of them. A
  whole-MLP step stores each res block's MLP output (conditional rows) and the CFG difference
  eps_c - eps_u. The other steps run the conditional rows only: the input projection and the
  adaLN gates are recomputed for the new (x_t, t), the blocks' MLP outputs are reused, the
  final layer runs, and eps_u = eps_c - (eps_c - eps_u)_cached.

The noise stream is the model's own (T_native draws per token), whatever T a step uses: step
j of any schedule takes draw j, so an accelerated image differs from exact MAR's only by the
approximation, never by different random numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from engine.model.diffloss import DiffLoss
from engine.model.diffusion import NUM_TRAIN_TIMESTEPS, DiffusionSchedule

HEAD_SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class HeadConfig:
    """Diffusion-head knobs. The defaults are exact MAR: the model's own steps, no cache."""

    schedule: str = "constant"  # DDPM steps per AR step: constant | linear | cosine
    upper: int | None = None  # steps at the first AR step (None: the model's own count)
    lower: int = 5  # steps at the last AR step (annealed schedules)
    clip: int = 950  # annealed schedules: the noisiest base timestep kept
    cache_period: int = 0  # head cache: a full MLP every cache_period-th step (0: off)
    cache_full_fraction: float = 0.1  # head cache: the noisiest share of steps always full

    def __post_init__(self) -> None:
        if self.schedule not in HEAD_SCHEDULES:
            raise ValueError(f"head schedule must be one of {HEAD_SCHEDULES}")
        if self.lower < 1 or (self.upper is not None and self.upper < self.lower):
            raise ValueError("head steps need 1 <= lower <= upper")
        if not 0 < self.clip < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"clip must be in 1..{NUM_TRAIN_TIMESTEPS - 1}")
        if self.cache_period < 0 or not 0.0 <= self.cache_full_fraction <= 1.0:
            raise ValueError("cache_period >= 0 and 0 <= cache_full_fraction <= 1 are needed")

    @property
    def exact(self) -> bool:
        return self.schedule == "constant" and self.upper is None and self.cache_period == 0

    def num_steps(self, step: int, num_iter: int, native: int) -> int:
        """DDPM steps of the head at AR step `step` of `num_iter`."""
        upper = native if self.upper is None else min(self.upper, native)
        if self.schedule == "constant":
            return upper
        lower = min(self.lower, upper)
        progress = step / (num_iter - 1) if num_iter > 1 else 0.0  # 0 first AR step, 1 last
        if self.schedule == "linear":
            weight = 1.0 - progress
        else:
            weight = 0.5 * (1.0 + math.cos(math.pi * progress))
        return lower + int(weight * (upper - lower))


@lru_cache(maxsize=256)
def clipped_schedule(num_steps: int, clip: int) -> DiffusionSchedule:
    """The cosine diffusion respaced to `num_steps` base timesteps evenly over [0, clip]."""
    kept = np.unique(np.round(np.linspace(0, clip, num_steps)).astype(np.int64))
    return DiffusionSchedule.from_kept(kept.tolist())


@dataclass(frozen=True, eq=False)
class HeadPlan:
    """What the head does for one AR step: its DDPM schedule and, under the head cache, the
    diffusion indices that run the whole MLP. Rows with equal `key`s share a head call."""

    schedule: DiffusionSchedule
    mlp_steps: frozenset[int] | None = None  # None: the whole MLP every step (no head cache)

    @property
    def key(self) -> tuple:
        return (id(self.schedule), self.mlp_steps)


class HeadPolicy:
    """Plans the head's work for an AR step under a `HeadConfig`."""

    def __init__(self, config: HeadConfig | None = None) -> None:
        self.config = config or HeadConfig()

    def schedule(
        self, head: DiffLoss, step: int, num_iter: int, scale: float = 1.0
    ) -> DiffusionSchedule:
        """The DDPM schedule of AR step `step` of `num_iter`; `scale` multiplies its step
        count (FTS: more steps for some tokens, fewer for others; rounded down, at least 1 and at
        most the native count)."""
        native = head.gen_schedule
        config = self.config
        if config.schedule == "constant" and config.upper is None:
            num_t = native.num_timesteps
        else:
            num_t = config.num_steps(step, num_iter, native.num_timesteps)
        if scale != 1.0:
            num_t = max(1, min(native.num_timesteps, math.floor(num_t * scale)))
        if config.schedule == "constant" and num_t >= native.num_timesteps:
            return native
        return clipped_schedule(num_t, config.clip)

    def plan(self, head: DiffLoss, step: int, num_iter: int, scale: float = 1.0) -> HeadPlan:
        schedule = self.schedule(head, step, num_iter, scale)
        if self.config.cache_period == 0:
            return HeadPlan(schedule)
        num_t = schedule.num_timesteps
        steps = whole_mlp_steps(num_t, self.config.cache_period, self.config.cache_full_fraction)
        return HeadPlan(schedule, steps)


@lru_cache(maxsize=1024)
def whole_mlp_steps(num_t: int, period: int, full_fraction: float) -> frozenset[int]:
    """Diffusion indices i (T-1 = noisiest) that run the whole MLP under the head cache."""
    num_noisy = math.ceil(full_fraction * num_t)
    return frozenset(
        i for i in range(num_t) if i >= num_t - max(1, num_noisy) or (num_t - 1 - i) % period == 0
    )
