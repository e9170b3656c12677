"""The transformer half of a decoding step over rows that may each be at a different step.

A `Call` is one transformer row of a step: one CFG half of one image, with its known and
predicted positions. Rows are ragged only in the encoder (buffer + the row's known tokens);
the decoder always sees buffer + L tokens. `full_pass` runs any set of calls through the
whole encoder and decoder at once: known positions are padded to the longest row and padded
keys are masked out of attention (exact: masked keys get zero weight); padded outputs land in
a scratch slot of the decoder input and are never read. Calls of MARché rows also refill
their slots' caches. MARché's lazy steps are in `marche.lazy_pass`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from engine.decode.pool import SlotPool
from engine.decode.profiling import NULL_TIMER, NullTimer, PhaseTimer
from engine.model.mar import MAR


@dataclass(eq=False)
class Call:
    """One CFG half of one image in this step's transformer batch."""

    slot: int  # the image's slot (its tokens)
    pool_row: int  # this half's pool row (its caches)
    label: Tensor | None  # (1,) class on the device; None: the null class (unconditional)
    known: Tensor  # (n,) positions generated so far, oldest first
    pred: Tensor  # (k,) positions predicted this step
    prev_pred: Tensor | None = None  # (k',) positions predicted on the row's previous step
    cache_encoder: bool = False  # full passes: fill the encoder caches (MARché "cache")
    cache_decoder_from: int | None = None  # full passes: fill decoder K/V from this layer
    refresh_rng: torch.Generator | None = None  # MARché's "random" refresh ablation
    h: Tensor | None = field(default=None, repr=False)  # (k, D) before decoder_norm at pred
    h_all: Tensor | None = field(default=None, repr=False)  # (L, D), full passes only
    active: float = 1.0  # fraction of the decoder's tokens that went through the late layers


@dataclass(frozen=True)
class Fill:
    """A pass that fills MARché's caches: the pool it writes, each row's pool row, whether
    the encoder's K/V and outputs are stored, and the first decoder layer whose K/V are."""

    pool: SlotPool
    pool_rows: list[int]
    encoder: bool
    decoder_from: int  # len(decoder_blocks): none


def pad(rows: list[Tensor], value: int) -> Tensor:
    """Ragged 1-D index rows -> (G, max n), padded with `value`."""
    return pad_sequence(rows, batch_first=True, padding_value=value)


def length_mask(lengths: list[int], device: torch.device) -> Tensor | None:
    """(G, max) True below each row's length; None when every row is full length."""
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return None
    positions = torch.arange(longest, device=device)
    return torch.stack([positions < n for n in lengths])


def class_embedding(model: MAR, calls: list[Call]) -> Tensor:
    """(G, D): the class embedding of conditional calls, the null class for the others.
    Calls are ordered conditional first."""
    labels = [c.label for c in calls if c.label is not None]
    parts = [model.class_emb(torch.cat(labels))] if labels else []
    num_null = len(calls) - len(labels)
    if num_null:
        parts.append(model.fake_latent.expand(num_null, -1))
    return torch.cat(parts)


def tokens_of(pool: SlotPool, calls: list[Call]) -> Tensor:
    """(G, L, C) current tokens of each call's image."""
    return torch.stack([pool.tokens[c.slot] for c in calls])


class PassUnits(Protocol):
    """Transformer passes as units (`pass_graphs.PassGraphs`): full passes by calling it,
    MARché's lazy passes by its `lazy` (`marche.LazyUnits`)."""

    lazy: Callable[..., bool] | None

    def __call__(
        self, model: MAR, tokens: Tensor, known: list[Tensor], cls: Tensor, timer, fill
    ) -> Tensor | None: ...


def full_pass(
    model: MAR,
    pool: SlotPool,
    calls: list[Call],
    timer: PhaseTimer | NullTimer = NULL_TIMER,
    units: PassUnits | None = None,
) -> None:
    """Full encoder + decoder for `calls`; sets each call's h and h_all, refills caches.
    `units` may run the pass (`pass_graphs.PassGraphs`)."""
    buf, seq_len = model.cfg.buffer_size, model.cfg.seq_len
    fill = any(c.cache_encoder for c in calls)  # encoder K/V and outputs into the pool
    starts = [c.cache_decoder_from for c in calls if c.cache_decoder_from is not None]
    fill_from = min(starts) if starts else len(model.decoder_blocks)  # decoder K/V from here
    if units is not None:
        fills = Fill(pool, [c.pool_row for c in calls], fill, fill_from) if fill or starts else None
        if _run_units(model, pool, calls, timer, units, fills):
            return
    rows = pool.rows([c.pool_row for c in calls])
    lengths = [len(c.known) for c in calls]
    key_mask = length_mask([buf + n for n in lengths], pool.device)
    with timer.phase("encoder"):
        x = model.encoder_input(
            tokens_of(pool, calls), pad([c.known for c in calls], 0), class_embedding(model, calls)
        )  # (G, buf + n_max, D)
        enc = encoder_layers(model, x, key_mask, pool if fill else None, rows)
        if fill:
            for c, n in zip(calls, lengths, strict=True):
                pool.enc_len[c.pool_row] = buf + n
    with timer.phase("decoder"):
        x = model.decoder_input(enc, pad([c.known for c in calls], seq_len))  # (G, buf + L, D)
        hidden = decoder_layers(model, x, fill_from, pool, rows)[:, buf:]  # (G, L, D)
        for c, h in zip(calls, hidden, strict=True):
            c.h_all, c.h, c.active = h, h[c.pred], 1.0


# -- the pieces of a full pass, shared by the eager pass above and its units (pass_graphs.py)


def encoder_layers(
    model: MAR, x: Tensor, key_mask: Tensor | None, pool: SlotPool | None, rows
) -> Tensor:
    """The encoder blocks and norm over x (G, buffer + n, D), padded keys masked; with a
    pool, each layer's K/V and the outputs go into slots [0, buffer + n) of pool `rows`."""
    for i, block in enumerate(model.encoder_blocks):
        if pool is not None:
            k, v = pool.kv("enc", i, block, x)
            x = block.forward_fill(x, k, v, rows, key_mask)
        else:
            x = block(x, key_mask)
    enc = model.encoder_norm(x)
    if pool is not None:
        pool.enc_out(enc)[rows, : enc.shape[1]] = enc
    return enc


def decoder_layers(model: MAR, x: Tensor, fill_from: int, pool: SlotPool | None, rows) -> Tensor:
    """The decoder blocks over x (G, buffer + L, D), before decoder_norm; from layer
    `fill_from` on, each layer's K/V go into pool `rows`."""
    for i, block in enumerate(model.decoder_blocks):
        if i >= fill_from:
            k, v = pool.kv("dec", i, block, x)
            x = block.forward_fill(x, k, v, rows, None)
        else:
            x = block(x)
    return x


def _run_units(model, pool: SlotPool, calls: list[Call], timer, units: PassUnits, fill) -> bool:
    """`full_pass` by `units`; False when none serves it."""
    hidden = units(model, tokens_of(pool, calls), [c.known for c in calls],
                   class_embedding(model, calls), timer, fill)  # fmt: skip
    if hidden is None:
        return False
    for c, h in zip(calls, hidden, strict=True):  # h: (L, D)
        c.h_all, c.h, c.active = h, h[c.pred], 1.0
        if fill is not None and fill.encoder:
            pool.enc_len[c.pool_row] = model.cfg.buffer_size + len(c.known)
    return True
