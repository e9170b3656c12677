"""The transformer's full pass, eager: every call through the whole encoder and decoder.

Exact MAR's every step and MARché's full steps (which also refill the calls' caches). Calls
may each be at a different step: rows are ragged only in the encoder (buffer + the call's
known tokens); the decoder always sees buffer + L tokens. Known positions are padded to the
longest call and padded keys are masked out of attention (exact: masked keys get zero
weight); padded outputs land in a scratch slot of the decoder input and are never read. Its
twin, run as units per bucket, is `units/full.py`; the two share `encoder_layers` and
`decoder_layers` below.
"""

from __future__ import annotations

from torch import Tensor

from engine.decode.passes.common import (
    Call,
    PassOutput,
    class_embedding,
    length_mask,
    pad,
    tokens_of,
)
from engine.decode.pool import SlotPool
from engine.decode.profiling import NULL_TIMER, NullTimer, PhaseTimer
from engine.model.mar import MAR


def fills(model: MAR, calls: list[Call]) -> tuple[bool, int]:
    """What a full pass over `calls` writes into their cache rows: the encoder's K/V and
    outputs (when any call caches its encoder), and decoder K/V from the returned layer on
    (len(decoder_blocks): none)."""
    starts = [c.cache_decoder_from for c in calls if c.cache_decoder_from is not None]
    encoder = any(c.cache_encoder for c in calls)
    return encoder, min(starts) if starts else len(model.decoder_blocks)


def full_pass(
    model: MAR,
    pool: SlotPool,
    calls: list[Call],
    timer: PhaseTimer | NullTimer = NULL_TIMER,
) -> PassOutput:
    """Full encoder + decoder for `calls`, refilling the caches `fills` names."""
    buf, seq_len = model.config.buffer_size, model.config.seq_len
    fill_encoder, fill_from = fills(model, calls)
    rows = pool.index([c.cache_row for c in calls])
    lengths = [len(c.known) for c in calls]
    key_mask = length_mask([buf + n for n in lengths], pool.device)
    with timer.phase("encoder"):
        x = model.encoder_input(
            tokens_of(pool, calls), pad([c.known for c in calls], 0), class_embedding(model, calls)
        )  # (G, buf + n_max, D)
        enc = encoder_layers(model, x, key_mask, pool if fill_encoder else None, rows)
    with timer.phase("decoder"):
        x = model.decoder_input(enc, pad([c.known for c in calls], seq_len))  # (G, buf + L, D)
        hidden = decoder_layers(model, x, fill_from, pool, rows)[:, buf:]  # (G, L, D)
    return full_output(model, calls, hidden, fill_encoder)


def full_output(model: MAR, calls: list[Call], hidden: Tensor, fill_encoder: bool) -> PassOutput:
    """The record of a full pass whose decoder gave `hidden` (G, L, D)."""
    buf = model.config.buffer_size
    return PassOutput(
        h=[h[c.pred] for c, h in zip(calls, hidden, strict=True)],
        active=[1.0] * len(calls),
        enc_len=[buf + len(c.known) for c in calls] if fill_encoder else None,
        h_all=hidden,
    )


# -- the pieces of a full pass, shared by the eager pass above and its units (units/full.py)


def encoder_layers(
    model: MAR, x: Tensor, key_mask: Tensor | None, pool: SlotPool | None, rows
) -> Tensor:
    """The encoder blocks and norm over x (G, buffer + n, D), padded keys masked; with a
    pool, each layer's K/V and the outputs go into slots [0, buffer + n) of cache `rows`."""
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
    `fill_from` on, each layer's K/V go into cache `rows`."""
    for i, block in enumerate(model.decoder_blocks):
        if i >= fill_from:
            k, v = pool.kv("dec", i, block, x)
            x = block.forward_fill(x, k, v, rows, None)
        else:
            x = block(x)
    return x
