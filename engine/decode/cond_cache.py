"""The CFG condition cache (LazyMAR, arXiv 2503.12450, §1.6 of our accelerator notes).

With guidance every step runs the transformer twice: the conditional half and the
unconditional (null-class) half. Their final hidden states differ by a residual that changes
slowly from step to step, so on a *full* step this policy stores, before `decoder_norm`,

    diff = h_uncond - h_cond        (B, L, D), every image position

and on the other steps runs only the conditional half through the inner policy (encoder and
decoder: half the transformer batch) and answers h_uncond = h_cond + diff at the predicted
positions. The head still sees both halves and applies its usual CFG formula.

It composes with either transformer policy (exact MAR or MARché). Its full steps force MARché
to refill every cache too, because the caches of the unconditional twin go stale while only
the conditional half runs. Without guidance it does nothing; with `refresh_period=1` it is
the inner policy exactly. Each image keeps its own phase; the engine (`step.py`) applies
this config, and `diff` lives in the image's slot of the pool.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CondCacheConfig:
    """Full (both-halves) steps: the first `warmup` steps and every `refresh_period`-th step
    (counted from the first, so they coincide with MARché's full steps at the same period)."""

    refresh_period: int = 3
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.refresh_period < 1 or self.warmup < 1:
            raise ValueError("refresh_period and warmup must be >= 1")

    def both_halves(self, step: int) -> bool:
        """Whether the row's `step`-th step (0-based) runs both CFG halves."""
        return step < self.warmup or step % self.refresh_period == 0
