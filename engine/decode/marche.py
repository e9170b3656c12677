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
full steps are `transformer.full_pass` (with the caches filled), lazy steps are `lazy_pass`
below, and rows at different steps share one lazy pass (ragged lengths are padded: padded
appended tokens and padded active tokens repeat a real one of their row, so they write the
same K/V to the same slot, and their outputs are dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.decode.pool import SlotPool
from engine.decode.profiling import NULL_TIMER, NullTimer, PhaseTimer
from engine.decode.transformer import Call, class_embedding, length_mask, pad, tokens_of
from engine.model.mar import MAR, gather_tokens

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


LazyUnits = Callable[..., bool]  # `lazy_graphs.LazyGraphs`


def lazy_pass(
    model: MAR,
    pool: SlotPool,
    config: MarcheConfig,
    calls: list[Call],
    timer: PhaseTimer | NullTimer = NULL_TIMER,
    units: LazyUnits | None = None,
) -> None:
    """A non-full MARché step for `calls` (rows whose caches are filled); sets each call's h.
    `units` may run it (`lazy_graphs.LazyGraphs`)."""
    if units is not None and units(model, pool, config, calls, timer):
        return
    buf, seq_len = model.cfg.buffer_size, model.cfg.seq_len
    rows = pool.rows([c.pool_row for c in calls])
    known = [c.known for c in calls]
    with timer.phase("encoder"):
        if config.encoder == "cache":
            enc = _append_encoder(model, pool, calls, rows)
        else:
            key_mask = length_mask([buf + len(k) for k in known], pool.device)
            enc = model.forward_encoder(
                tokens_of(pool, calls), pad(known, 0), class_embedding(model, calls), key_mask
            )
    with timer.phase("decoder"):
        x = model.decoder_input(enc, pad(known, seq_len))  # (G, buf + L, D)
        gen = [buf + c.pred for c in calls]
        query_mask = length_mask([len(g) for g in gen], pool.device)
        x, scores = scored_layers(model, config, x, _pad_repeat(gen), query_mask)
        active, counts = active_slots(scores, calls, buf, config)  # (G, A), generating first
        offsets = [c.pool_row * pool.num_slots for c in calls]
        flat = torch.cat([a + o for a, o in zip(active, offsets, strict=True)])  # (G*A,)
        x = active_layers(model, pool, config, x, active, flat, rows)
        for c, h, n in zip(calls, x, counts, strict=True):
            c.h, c.active = h[: len(c.pred)], n / pool.num_slots


def _append_encoder(model: MAR, pool: SlotPool, calls: list[Call], rows) -> Tensor:
    """The append-only encoder cache: the tokens known since each row's last call go
    through the encoder; returns the cached outputs (G, buffer + n_max, D)."""
    buf = model.cfg.buffer_size
    starts = [pool.enc_len[c.pool_row] for c in calls]
    new = [c.known[s - buf :] for c, s in zip(calls, starts, strict=True)]  # newest tokens
    slots = [  # where each new token's K/V go: pool row * N + slot
        c.pool_row * pool.num_slots + torch.arange(s, s + len(n), device=pool.device)
        for c, s, n in zip(calls, starts, new, strict=True)
    ]
    flat = _pad_repeat(slots).flatten()  # (G*m,)
    ends = [s + len(n) for s, n in zip(starts, new, strict=True)]
    key_mask = length_mask(ends, pool.device)  # (G, max end) or None
    x = model.embed_known(tokens_of(pool, calls), _pad_repeat(new))  # (G, m, D)
    enc_out = append_layers(model, pool, x, flat, rows, max(ends), key_mask)
    for c, end in zip(calls, ends, strict=True):
        pool.enc_len[c.pool_row] = end
    return enc_out[rows, : max(ends)]


# -- the pieces of a lazy pass, shared by the eager pass above and its units (lazy_graphs.py)


def append_layers(
    model: MAR, pool: SlotPool, x: Tensor, flat: Tensor, rows, end: int, key_mask: Tensor | None
) -> Tensor:
    """The encoder over appended tokens x (G, m, D) whose slots are flat (G*m,) = pool row
    * N + slot: their K/V and outputs go into the pool; keys are slots [0, end) (key_mask
    (G, end): each row's prefix). Returns the pool's encoder outputs (2 cap + 1, N, D)."""
    for i, block in enumerate(model.encoder_blocks):
        k, v = pool.kv("enc", i, block, x)
        x = block.forward_append(x, flat, k, v, rows, end, key_mask)
    out = model.encoder_norm(x)
    enc_out = pool.enc_out(out)
    enc_out.view(-1, out.shape[-1]).index_copy_(0, flat, out.reshape(-1, out.shape[-1]))
    return enc_out


def scored_layers(
    model: MAR, config: MarcheConfig, x: Tensor, query_idx: Tensor, query_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The decoder layers up to the selection layer, full attention; the last of them scores
    every token by the attention it receives from the queries (the generating tokens at
    query_idx (G, g), where query_mask). Returns x (G, buf + L, D) and scores (G, N)."""
    blocks, sel = model.decoder_blocks, config.selection_layer
    for block in blocks[: sel - 1]:
        x = block(x)
    return blocks[sel - 1].forward_scored(x, query_idx, query_mask)


def refresh_candidates(scores: Tensor, forced: Tensor, rule: str) -> Tensor:
    """Scores (G, N) to pick refreshing tokens by (top-k), the forced slots (G, f) never."""
    if rule == "low_attention":
        scores = -scores
    return scores.scatter(1, forced, float("-inf"))


def active_layers(
    model: MAR, pool: SlotPool, config: MarcheConfig, x: Tensor, active: Tensor, flat, rows
) -> Tensor:
    """The layers after the selection layer over the active tokens (G, A) of x only, their
    K/V written at flat (G*A,) and attending over each row's cache: (G, A, D)."""
    x = gather_tokens(x, active)
    for i, block in enumerate(model.decoder_blocks[config.selection_layer :]):
        layer = config.selection_layer + i
        k, v = pool.kv("dec", layer, block, x)
        x = block.forward_active(x, flat, k, v, rows)
    return x


def _pad_repeat(rows: list[Tensor]) -> Tensor:
    """Ragged 1-D rows -> (G, max n), each padded with copies of its own first entry."""
    longest = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r[:1].expand(longest - len(r))]) for r in rows])


def active_slots(
    scores: Tensor, calls: list[Call], buf: int, config: MarcheConfig
) -> tuple[Tensor, list[int]]:
    """[generating | caching | refreshing] slots per row, and each row's count of distinct
    ones. A row's set depends on its own scores and positions only; shorter rows are padded
    with copies of their first generating slot."""
    num_slots = scores.shape[1]
    forced = []  # generating first, then caching tokens: disjoint position sets
    for c in calls:
        parts = [buf + c.pred]
        if config.caching_tokens and c.prev_pred is not None:
            parts.append(buf + c.prev_pred)
        forced.append(torch.cat(parts))
    refresh = [max(0, min(config.budget, num_slots) - len(f)) for f in forced]
    forced_slots = _pad_repeat(forced)  # (G, f_max)
    counts = [len(f) + r for f, r in zip(forced, refresh, strict=True)]
    if max(refresh) == 0:
        return forced_slots, counts
    if config.refresh == "random":
        scores = torch.stack(
            [torch.rand(num_slots, generator=c.refresh_rng, device=scores.device) for c in calls]
        )
    scores = refresh_candidates(scores, forced_slots, config.refresh)
    top = scores.topk(max(refresh), dim=1).indices  # (G, r_max), best first
    if min(refresh) < max(refresh):  # keep each row's own top r; pad with its first slot
        keep = length_mask(refresh, scores.device)
        top = torch.where(keep, top, forced_slots[:, :1])
    return torch.cat([forced_slots, top], dim=1), counts
