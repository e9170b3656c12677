"""MARché's lazy pass, eager: a non-full step over calls whose caches are filled.

Rows at different steps share one lazy pass. The tokens known since a call's last pass go
through the append-only encoder cache (encoder "cache"; "full" recomputes it); the decoder
runs its first layers in full up to the selection layer, which scores every token by the
attention it receives from the generating tokens; the active set (generating, caching,
top-scored refreshing tokens, up to the budget) goes through the late layers, attending over
each call's cache. Ragged lengths are padded: padded appended tokens and padded active tokens
repeat a real one of their row, so they write the same K/V to the same slot, and their
outputs are dropped. Its twin, run as units per bucket, is `units/lazy.py`; the two share
`append_layers`, `scored_layers`, `refresh_candidates` and `active_layers` below.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.decode.marche import MarcheConfig
from engine.decode.passes.common import (
    Call,
    PassOutput,
    class_embedding,
    length_mask,
    pad,
    pad_repeat,
    tokens_of,
)
from engine.decode.pool import SlotPool
from engine.decode.profiling import NULL_TIMER, NullTimer, PhaseTimer
from engine.model.mar import MAR, gather_tokens


def lazy_pass(
    model: MAR,
    pool: SlotPool,
    config: MarcheConfig,
    calls: list[Call],
    timer: PhaseTimer | NullTimer = NULL_TIMER,
) -> PassOutput:
    """A non-full MARché step for `calls` (rows whose caches are filled)."""
    buf, seq_len = model.config.buffer_size, model.config.seq_len
    rows = pool.index([c.cache_row for c in calls])
    known = [c.known for c in calls]
    enc_len = None  # the "full" encoder ablation keeps no encoder cache
    with timer.phase("encoder"):
        if config.encoder == "cache":
            enc, enc_len = _append_encoder(model, pool, calls, rows)
        else:
            key_mask = length_mask([buf + len(k) for k in known], pool.device)
            enc = model.forward_encoder(
                tokens_of(pool, calls), pad(known, 0), class_embedding(model, calls), key_mask
            )
    with timer.phase("decoder"):
        x = model.decoder_input(enc, pad(known, seq_len))  # (G, buf + L, D)
        gen = [buf + c.pred for c in calls]
        query_mask = length_mask([len(g) for g in gen], pool.device)
        x, scores = scored_layers(model, config, x, pad_repeat(gen), query_mask)
        active, counts = active_slots(scores, calls, buf, config)  # (G, A), generating first
        offsets = [c.cache_row * pool.num_slots for c in calls]
        flat = torch.cat([a + o for a, o in zip(active, offsets, strict=True)])  # (G*A,)
        x = active_layers(model, pool, config, x, active, flat, rows)  # (G, A, D)
    return PassOutput(
        h=[h[: len(c.pred)] for c, h in zip(calls, x, strict=True)],
        active=[n / pool.num_slots for n in counts],
        enc_len=enc_len,
    )


def _append_encoder(
    model: MAR, pool: SlotPool, calls: list[Call], rows
) -> tuple[Tensor, list[int]]:
    """The append-only encoder cache: the tokens known since each call's last pass go
    through the encoder. Returns the cached outputs (G, buffer + n_max, D) and each cache
    row's encoder length after the pass."""
    buf = model.config.buffer_size
    starts = [pool.enc_len[c.cache_row] for c in calls]
    new = [c.known[s - buf :] for c, s in zip(calls, starts, strict=True)]  # newest tokens
    slots = [  # where each new token's K/V go: cache row * N + slot
        c.cache_row * pool.num_slots + torch.arange(s, s + len(n), device=pool.device)
        for c, s, n in zip(calls, starts, new, strict=True)
    ]
    flat = pad_repeat(slots).flatten()  # (G*m,)
    ends = [s + len(n) for s, n in zip(starts, new, strict=True)]
    key_mask = length_mask(ends, pool.device)  # (G, max end) or None
    x = model.embed_known(tokens_of(pool, calls), pad_repeat(new))  # (G, m, D)
    enc_out = append_layers(model, pool, x, flat, rows, max(ends), key_mask)
    return enc_out[rows, : max(ends)], ends


# -- the pieces of a lazy pass, shared by the eager pass above and its units (units/lazy.py)


def append_layers(
    model: MAR, pool: SlotPool, x: Tensor, flat: Tensor, rows, end: int, key_mask: Tensor | None
) -> Tensor:
    """The encoder over appended tokens x (G, m, D) whose slots are flat (G*m,) = cache row
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
    forced_slots = pad_repeat(forced)  # (G, f_max)
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
