"""The CFG condition cache (LazyMAR, arXiv 2503.12450, §1.6 of our accelerator notes).

With guidance every step runs the transformer twice: the conditional half and the
unconditional (null-class) half. Their final hidden states differ by a residual that changes
slowly from step to step, so on a *full* step this policy stores, before `decoder_norm`,

    diff = h_uncond - h_cond        (B, L, D), every image position

and on the other steps runs only the conditional half through the inner policy (encoder and
decoder: half the transformer batch) and answers h_uncond = h_cond + diff at the predicted
positions. The head still sees both halves and applies its usual CFG formula.

It wraps any transformer policy (exact MAR or MARché). Its full steps force the inner policy
to refill every cache too, because the inner caches of the unconditional rows go stale while
only the conditional half runs. Without guidance it is a pass-through; with
`refresh_period=1` it is the inner policy exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from engine.model.mar import MAR, gather_tokens

if TYPE_CHECKING:
    from engine.decode.policy import DecodePolicy


@dataclass(frozen=True)
class CondCacheConfig:
    """Full (both-halves) steps: the first `warmup` steps and every `refresh_period`-th step
    (counted from the first, so they coincide with MARché's full steps at the same period)."""

    refresh_period: int = 3
    warmup: int = 1

    def __post_init__(self) -> None:
        if self.refresh_period < 1 or self.warmup < 1:
            raise ValueError("refresh_period and warmup must be >= 1")

    def full(self, call: int) -> bool:
        return call < self.warmup or call % self.refresh_period == 0


class CondCache:
    """The condition cache around an inner transformer policy (see module docstring)."""

    def __init__(self, inner: DecodePolicy, config: CondCacheConfig | None = None) -> None:
        self.inner, self.config = inner, config or CondCacheConfig()
        self.head = inner.head
        self.name = f"{inner.name}+cond_cache"

    @property
    def stats(self) -> list[float]:
        return getattr(self.inner, "stats", [])

    def begin(self, model: MAR, batch_size: int, num_iter: int) -> None:
        self.inner.begin(model, batch_size, num_iter)
        self.batch_size = batch_size
        self.num_calls = 0
        self.full = True
        self.guided = False
        self.diff: Tensor | None = None  # (B, L, D) h_uncond - h_cond of the last full step
        self.lazy_steps = 0

    def encode(
        self,
        model: MAR,
        step: int,
        tokens: Tensor,
        known_idx: Tensor,
        class_embedding: Tensor,
        force_full: bool = False,
    ) -> Tensor:
        self.guided = len(tokens) == 2 * self.batch_size
        self.full = force_full or self.diff is None or self.config.full(self.num_calls)
        self.num_calls += 1
        if not self.guided:
            return self.inner.encode(model, step, tokens, known_idx, class_embedding, force_full)
        if self.full:
            return self.inner.encode(model, step, tokens, known_idx, class_embedding, True)
        self.lazy_steps += 1
        b = self.batch_size  # the conditional half only
        return self.inner.encode(model, step, tokens[:b], known_idx[:b], class_embedding[:b])

    def decode(
        self,
        model: MAR,
        step: int,
        enc: Tensor,
        known_idx: Tensor,
        pred_idx: Tensor,
        all_positions: bool = False,
    ) -> Tensor:
        if not self.guided:
            return self.inner.decode(model, step, enc, known_idx, pred_idx, all_positions)
        if self.full:
            h = self.inner.decode(model, step, enc, known_idx, pred_idx, all_positions=True)
            cond, uncond = h.chunk(2)  # each (B, L, D)
            self.diff = uncond - cond
            return h if all_positions else gather_tokens(h, pred_idx)
        b = self.batch_size
        h_cond = self.inner.decode(model, step, enc, known_idx[:b], pred_idx[:b], all_positions)
        diff = self.diff if all_positions else gather_tokens(self.diff, pred_idx[:b])
        return torch.cat([h_cond, h_cond + diff])

    def select(self, rows: Tensor) -> None:
        self.inner.select(rows)
        if self.guided:  # rows = [kept; kept + B]
            kept = rows[: len(rows) // 2]
            self.diff = None if self.diff is None else self.diff[kept]
            self.batch_size = len(kept)
        else:
            self.batch_size = len(rows)
