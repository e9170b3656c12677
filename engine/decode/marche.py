"""MARché decoding (arXiv 2506.12035): cache-aware attention with selective KV refresh.

Each step the decoder splits its buffer + L tokens into *active* and *cached* sets:

* active = generating tokens (predicted this step) ∪ caching tokens (generated last step,
  not yet in the cache) ∪ refreshing tokens (top-K by attention received from the
  generating tokens at the selection layer), filled up to a fixed budget;
* the first `selection_layer` decoder layers run full attention; the last of them scores;
* later layers push only active tokens through QKV/attention/MLP; cached tokens contribute
  their stored K/V (one SDPA over a token-major per-layer cache, no concatenation);
* the first step, and every `refresh_period`-th step, is a full step that refills all caches.

The encoder is a knob: "full" recomputes it (exact given the tokens, as baseline), "cache"
keeps an append-only cache (as LazyMAR): only newly known tokens go through it between full
steps. With a budget covering every token and a refresh each step, the output equals
baseline MAR.

Every cache lives in the row's slot of a `SlotPool`, and each row keeps its own refresh phase:
full steps are `passes/full.py` (with the caches filled), lazy steps are `passes/lazy.py`
(eager) or `units/lazy.py` (units). This file holds MARché's knobs.
"""

from __future__ import annotations

from dataclasses import dataclass

REFRESH_RULES = ("attention", "random", "low_attention")
ENCODER_MODES = ("full", "cache")


@dataclass(frozen=True)
class MarcheConfig:
    """MARché knobs, with the paper's defaults; the ablations are for the quality harness."""

    budget: int = 64  # active tokens per image per step (generating + caching + refreshing)
    selection_layer: int = 2  # 1-based decoder layer that scores; it and those before: full
    refresh_period: int = 3  # a full step every R steps (the first step is always full)
    encoder: str = "cache"  # "full" recompute, or "cache" (append-only)
    caching_tokens: bool = True  # ablation: False leaves last step's tokens out of the set
    refresh: str = "attention"  # ablations: "random", "low_attention"

    def __post_init__(self) -> None:
        if self.budget < 1 or self.selection_layer < 1 or self.refresh_period < 1:
            raise ValueError("budget, selection_layer and refresh_period must be >= 1")
        if self.refresh not in REFRESH_RULES:
            raise ValueError(f"refresh must be one of {REFRESH_RULES}")
        if self.encoder not in ENCODER_MODES:
            raise ValueError(f"encoder must be one of {ENCODER_MODES}")
