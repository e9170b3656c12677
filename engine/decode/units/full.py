"""The transformer's full pass as two units (encoder, decoder) per (call bucket, known-token
bucket): the twin of `passes/full.py` (modes: `units/common.py`).

A full pass (exact MAR's every step, MARché's full steps) has ragged shapes: G calls (CFG
halves of images), each with its own number of known tokens. Padded to a call bucket and a
known-token bucket (every L/8 tokens by default), with pad tokens masked out of the
encoder's attention and scattered into the decoder's scratch slot as the eager pass does, it
becomes a fixed computation over static buffers: the encoder (embedding, blocks, norm) and
the decoder (scatter into mask tokens, blocks). A pass that refills MARché's caches also writes each
call's K/V (and encoder outputs) into the step engine's slot pool at its cache row, as the
eager pass does; pad rows write to the pool's scratch row, which nothing reads, and pad
tokens to slots past the row's length, which readers never reach (the eager pass writes its
ragged rows' padding the same way). Such units are bound to their pool. Shapes above the
largest buckets run eager (counted as misses).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from engine.decode.passes.common import Call, PassOutput, class_embedding, pad, tokens_of
from engine.decode.passes.full import decoder_layers, encoder_layers, fills, full_output
from engine.decode.pool import SlotPool, to_device
from engine.decode.profiling import NULL_TIMER, NullTimer, PhaseTimer
from engine.decode.units.common import Units, bucket_for, parse_buckets
from engine.model.mar import MAR

PASS_BUCKETS = (1, 2, 4, 8, 16, 32)  # calls (CFG halves of images) per transformer pass


class Fill(NamedTuple):
    """A pass that fills caches: the pool it writes, each call's cache row, whether the
    encoder's K/V and outputs are stored, and the first decoder layer whose K/V are."""

    pool: SlotPool
    cache_rows: list[int]
    encoder: bool
    decoder_from: int  # len(decoder_blocks): none


@dataclass(eq=False)
class _Buffers:
    """One (rows, known tokens) bucket's static inputs and the encoder's output."""

    tokens: Tensor  # (G, L, C) each row's image tokens
    known_enc: Tensor  # (G, n) known positions; pads 0 (masked out)
    known_dec: Tensor  # (G, n) known positions; pads L (the decoder's scratch slot)
    cls: Tensor  # (G, D) class (or null) embedding
    key_mask: Tensor  # (G, buffer + n) True at the buffer and known tokens
    cache_rows: Tensor  # (G,) fills: each call's cache row; pad rows the pool's scratch row
    enc: Tensor | None = None  # (G, buffer + n, D) encoder output, allocated at first run

    def load(self, tokens: Tensor, known: list[Tensor], cls: Tensor, seq_len: int) -> None:
        g, n = len(known), max(len(k) for k in known)
        buf = self.key_mask.shape[1] - self.known_enc.shape[1]  # the buffer's length
        self.tokens[:g].copy_(tokens)
        self.cls[:g].copy_(cls)
        if n:
            self.known_enc[:g, :n].copy_(pad(known, 0))
            self.known_dec[:g, :n].copy_(pad(known, seq_len))
        self.known_enc[:g, n:].zero_()
        self.known_dec[:g, n:].fill_(seq_len)
        torch.ne(self.known_dec[:g], seq_len, out=self.key_mask[:g, buf:])

    def load_rows(self, fill: Fill) -> None:
        pads = [fill.pool.scratch] * (len(self.cache_rows) - len(fill.cache_rows))
        self.cache_rows.copy_(to_device(fill.cache_rows + pads, self.cache_rows.device),
                              non_blocking=True)  # fmt: skip


class FullUnits(Units):
    """Runs full passes (`passes.full.full_pass`'s arguments) as units. Passes that fill
    MARché's caches write into one step engine's pool, so their units are bound to it: built
    on first use (never under compile), gone with it. The continuous scheduler's pool lives
    as long as the server; the batch sampler makes one per batch, so under CUDA graphs its
    refill units are captured per batch."""

    def __init__(
        self,
        model: MAR,
        mode: str,
        buckets: str | Sequence[int] = PASS_BUCKETS,
        lengths: str | Sequence[int] | None = None,
    ) -> None:
        super().__init__(mode, model.class_emb.weight.device, buckets)
        seq_len = model.config.seq_len
        step = max(1, seq_len // 8)
        self.model, self.buckets = model, self.stats.buckets
        self.lengths = parse_buckets(lengths or range(step, seq_len + step, step))
        self._buffers: dict[tuple[int, int], _Buffers] = {}
        self._units: dict[tuple, tuple[Callable, Callable]] = {}  # passes that fill nothing
        self._fills: weakref.WeakKeyDictionary[SlotPool, dict] = weakref.WeakKeyDictionary()

    def can_run(
        self, model: MAR, pool: SlotPool, calls: list[Call], timer: object = NULL_TIMER
    ) -> bool:
        """Buckets hold the calls, and their unit exists or may be built now (refill units are
        built on first use, but never compiled while serving)."""
        if model is not self.model:
            return False
        plan = self._plan(pool, calls)
        return plan is not None and (plan[2] in plan[3] or self.mode != "compile")

    def run(
        self,
        model: MAR,
        pool: SlotPool,
        calls: list[Call],
        timer: PhaseTimer | NullTimer = NULL_TIMER,
    ) -> PassOutput:
        """`passes.full.full_pass` of `calls` as units."""
        plan = self._plan(pool, calls)
        assert plan is not None
        rows, length, key, units, fill = plan
        buffers = self._buffers_for(rows, length)
        known = [c.known for c in calls]
        buffers.load(tokens_of(pool, calls), known, class_embedding(model, calls),
                     model.config.seq_len)  # fmt: skip
        if fill is not None:
            buffers.load_rows(fill)
        if key not in units:  # built on this call's inputs: a capture's warm-up runs it, and
            units[key] = self._build(rows, length, fill)  # a refill writes the pool
        encoder, decoder = units[key]
        self.stats.padded_rows += rows - len(calls)
        with timer.phase("encoder"):
            encoder()
        with timer.phase("decoder"):
            hidden = decoder()[: len(calls)].clone()  # (G, L, D): the next run overwrites it
        return full_output(model, calls, hidden, fill is not None and fill.encoder)

    def _plan(self, pool: SlotPool, calls: list[Call]) -> tuple | None:
        """The pass's (call bucket, known-token bucket), its unit's key, the units it lives
        among (bound to `pool` when it fills caches) and what it fills; None above the
        largest buckets."""
        rows = bucket_for(len(calls), self.buckets)
        length = bucket_for(max(1, max(len(c.known) for c in calls)), self.lengths)
        if rows is None or length is None:
            return None
        encoder, decoder_from = fills(self.model, calls)
        if not encoder and decoder_from == len(self.model.decoder_blocks):
            return rows, length, (rows, length), self._units, None
        fill = Fill(pool, [c.cache_row for c in calls], encoder, decoder_from)
        key = (rows, length, encoder, decoder_from)
        return rows, length, key, self._fills.setdefault(pool, {}), fill

    @property
    def bound_pools(self) -> int:
        """Slot pools that refill units are bound to (each gone with its pool)."""
        return len(self._fills)

    def warm(self, buckets: Sequence[int] | None = None) -> None:
        """Build every plain (rows, length) unit of these call buckets (default: all) now,
        largest first, and log time and memory."""
        started = time.perf_counter()
        for rows in reversed(buckets or self.buckets):
            for length in reversed(self.lengths):
                if (rows, length) not in self._units:
                    self._units[(rows, length)] = self._build(rows, length, None)
        self.log_built("transformer", len(self._units), time.perf_counter() - started)

    def _buffers_for(self, rows: int, length: int) -> _Buffers:
        if (rows, length) not in self._buffers:
            dev, config = self.device, self.model.config
            key_mask = torch.zeros(rows, config.buffer_size + length, dtype=torch.bool, device=dev)
            key_mask[:, : config.buffer_size] = True
            seq_len = config.seq_len
            b = self._buffers[(rows, length)] = _Buffers(
                tokens=torch.zeros(rows, seq_len, config.token_embed_dim, device=dev),
                known_enc=torch.zeros(rows, length, dtype=torch.long, device=dev),
                known_dec=torch.full((rows, length), seq_len, dtype=torch.long, device=dev),
                cls=torch.zeros(rows, config.encoder_embed_dim, device=dev),
                key_mask=key_mask,
                cache_rows=torch.zeros(rows, dtype=torch.long, device=dev),
            )
            self.count_buffers(b.tokens, b.known_enc, b.known_dec, b.cls, b.key_mask)
        return self._buffers[(rows, length)]

    def _build(self, rows: int, length: int, fill: Fill | None) -> tuple[Callable, Callable]:
        model, buf = self.model, self.model.config.buffer_size
        b = self._buffers_for(rows, length)
        depth = len(model.decoder_blocks)
        pool_ref = None if fill is None else weakref.ref(fill.pool)  # units must not keep it alive
        fill_encoder = fill is not None and fill.encoder
        fill_from = depth if fill is None else fill.decoder_from

        def encoder() -> None:  # as passes.full.full_pass's encoder phase
            x = model.encoder_input(b.tokens, b.known_enc, b.cls)  # (G, buffer + n, D)
            pool = pool_ref() if fill_encoder else None
            out = encoder_layers(model, x, b.key_mask, pool, b.cache_rows)
            if b.enc is None:
                b.enc = torch.empty_like(out)
            b.enc.copy_(out)

        def decoder() -> Tensor:  # as passes.full.full_pass's decoder phase
            x = model.decoder_input(b.enc, b.known_dec)  # (G, buffer + L, D)
            pool = pool_ref() if pool_ref is not None else None
            return decoder_layers(model, x, fill_from, pool, b.cache_rows)[:, buf:]

        with self.building():
            if self.mode == "compile":
                encoder()  # allocates b.enc outside the compiled code (graphs: in the warm-up)
            return self.runner(encoder), self.runner(decoder)
