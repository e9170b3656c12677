"""Decoding policies: how the transformer turns the current tokens into conditions z.

The sampler calls `policy.condition(...)` once per step and never branches on the policy.
`FullRecompute` is baseline MAR (the exact oracle); MARché's cache-aware policy implements the
same protocol.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from engine.model import MAR, gather_tokens


class DecodePolicy(Protocol):
    name: str

    def begin(self, model: MAR, batch_size: int, num_iter: int) -> None:
        """Called once before the first step of a run (allocate caches here)."""
        ...

    def condition(
        self,
        model: MAR,
        step: int,
        tokens: Tensor,
        known_idx: Tensor,
        pred_idx: Tensor,
        class_embedding: Tensor,
    ) -> Tensor:
        """z (B', k, D) for the positions pred_idx (B', k); B' is 2B with CFG."""
        ...


class FullRecompute:
    """Baseline MAR: full encoder and decoder passes every step."""

    name = "mar"

    def begin(self, model: MAR, batch_size: int, num_iter: int) -> None:
        pass

    def condition(
        self,
        model: MAR,
        step: int,
        tokens: Tensor,
        known_idx: Tensor,
        pred_idx: Tensor,
        class_embedding: Tensor,
    ) -> Tensor:
        x = model.forward_encoder(tokens, known_idx, class_embedding)
        z = model.forward_decoder(x, known_idx)  # (B', L, D)
        return gather_tokens(z, pred_idx)


def make_policy(mode: str) -> DecodePolicy:
    """The decoding policy for a request's `mode`."""
    if mode == "mar":
        return FullRecompute()
    raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


MODES = ("mar",)
