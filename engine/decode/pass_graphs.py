"""The transformer's full pass as two units (encoder, decoder) per (row bucket, known-token
bucket) (modes: `graphs.py`).

A full pass (exact MAR's every step, MARché's full steps) has ragged shapes: G rows (CFG
halves), each with its own number of known tokens. Padded to a row bucket and a known-token
bucket (every L/8 tokens by default), with pad tokens masked out of the encoder's attention
and scattered into the decoder's scratch slot as the eager pass does, it becomes a fixed
computation over static buffers: the encoder (embedding, blocks, norm) and the decoder
(scatter into mask tokens, blocks). A pass that refills MARché's caches also writes each
row's K/V (and encoder outputs) into the step engine's slot pool at its pool row, as the
eager pass does; pad rows write to the pool's scratch row, which nothing reads, and pad
tokens to slots past the row's length, which readers never reach (the eager pass writes its
ragged rows' padding the same way). Such units are bound to their pool. Shapes above the
largest buckets run eager (counted as misses). MARché's lazy steps run as the units of
`lazy`, a `lazy_graphs.LazyGraphs` with the same buckets and CUDA graph pool.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.decode.graphs import GRAPH_MODES, Units, bucket_for, compare, log, parse_buckets
from engine.decode.lazy_graphs import LazyGraphs
from engine.decode.pool import SlotPool, to_device
from engine.decode.profiling import NULL_TIMER, NullTimer, PhaseTimer
from engine.decode.transformer import Fill, decoder_layers, encoder_layers, pad
from engine.model.mar import MAR

PASS_BUCKETS = (1, 2, 4, 8, 16, 32)  # transformer rows (CFG halves) per pass


@dataclass(eq=False)
class _Buffers:
    """One (rows, known tokens) bucket's static inputs and the encoder's output."""

    tokens: Tensor  # (G, L, C) each row's image tokens
    known_enc: Tensor  # (G, n) known positions; pads 0 (masked out)
    known_dec: Tensor  # (G, n) known positions; pads L (the decoder's scratch slot)
    cls: Tensor  # (G, D) class (or null) embedding
    key_mask: Tensor  # (G, buffer + n) True at the buffer and known tokens
    pool_rows: Tensor  # (G,) fills: each row's pool row; pad rows the pool's scratch row
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
        rows = fill.pool_rows + [fill.pool.scratch] * (len(self.pool_rows) - len(fill.pool_rows))
        self.pool_rows.copy_(to_device(rows, self.pool_rows.device), non_blocking=True)


class PassGraphs(Units):
    """Runs full passes as units; `__call__` returns None when none serves the pass (the
    caller runs it eager). Passes that fill MARché's caches write into one step engine's
    pool, so their units are bound to it: built on first use (never under compile), gone
    with it. The continuous scheduler's pool lives as long as the server; the batch sampler
    makes one per batch, so under CUDA graphs its refill units are captured per batch."""

    def __init__(
        self,
        model: MAR,
        mode: str,
        buckets: str | Sequence[int] = PASS_BUCKETS,
        lengths: str | Sequence[int] | None = None,
    ) -> None:
        super().__init__(mode, model.class_emb.weight.device, buckets)
        seq_len = model.cfg.seq_len
        step = max(1, seq_len // 8)
        self.model, self.buckets = model, self.stats.buckets
        self.lengths = parse_buckets(lengths or range(step, seq_len + step, step))
        self._buffers: dict[tuple[int, int], _Buffers] = {}
        self._units: dict[tuple, tuple[Callable, Callable]] = {}  # passes that fill nothing
        self._fills: weakref.WeakKeyDictionary[SlotPool, dict] = weakref.WeakKeyDictionary()
        self.lazy = LazyGraphs(model, mode, self.buckets, self.lengths, self.graph_pool)

    def __call__(
        self,
        model: MAR,
        tokens: Tensor,
        known: list[Tensor],
        cls: Tensor,
        timer: PhaseTimer | NullTimer = NULL_TIMER,
        fill: Fill | None = None,
    ) -> Tensor | None:
        """(G, L, D) hidden states before decoder_norm for G rows (tokens (G, L, C), known
        positions per row, class embeddings (G, D)), or None: run it eager."""
        g, n = len(known), max(len(k) for k in known)
        rows, length = bucket_for(g, self.buckets), bucket_for(max(n, 1), self.lengths)
        if model is not self.model or rows is None or length is None:
            self.stats.misses += 1
            return None
        key = (rows, length) if fill is None else (rows, length, fill.encoder, fill.decoder_from)
        units = self._units if fill is None else self._fills.setdefault(fill.pool, {})
        if key not in units and self.mode == "compile":  # never compile while serving
            self.stats.misses += 1
            return None
        buffers = self._buffers_for(rows, length)
        buffers.load(tokens, known, cls, model.cfg.seq_len)
        if fill is not None:
            buffers.load_rows(fill)
        if key not in units:  # built on this call's inputs: a capture's warm-up runs it, and
            units[key] = self._build(rows, length, fill)  # a refill writes the pool
        encoder, decoder = units[key]
        self.stats.hits += 1
        self.stats.padded_rows += rows - g
        with timer.phase("encoder"):
            encoder()
        with timer.phase("decoder"):
            return decoder()[:g].clone()  # the next run overwrites its output

    @property
    def bound_pools(self) -> int:
        """Slot pools that refill units are bound to (each gone with its pool)."""
        return len(self._fills)

    def warm(self, buckets: Sequence[int] | None = None) -> None:
        """Build every plain (rows, length) unit of these row buckets (default: all) now,
        largest first, and log time and memory."""
        started = time.perf_counter()
        for rows in reversed(buckets or self.buckets):
            for length in reversed(self.lengths):
                if (rows, length) not in self._units:
                    self._units[(rows, length)] = self._build(rows, length, None)
        self.log_built("transformer", len(self._units), time.perf_counter() - started)

    def _buffers_for(self, rows: int, length: int) -> _Buffers:
        if (rows, length) not in self._buffers:
            dev, cfg = self.device, self.model.cfg
            key_mask = torch.zeros(rows, cfg.buffer_size + length, dtype=torch.bool, device=dev)
            key_mask[:, : cfg.buffer_size] = True
            b = self._buffers[(rows, length)] = _Buffers(
                tokens=torch.zeros(rows, cfg.seq_len, cfg.token_embed_dim, device=dev),
                known_enc=torch.zeros(rows, length, dtype=torch.long, device=dev),
                known_dec=torch.full((rows, length), cfg.seq_len, dtype=torch.long, device=dev),
                cls=torch.zeros(rows, cfg.encoder_embed_dim, device=dev),
                key_mask=key_mask,
                pool_rows=torch.zeros(rows, dtype=torch.long, device=dev),
            )
            self.count_buffers(b.tokens, b.known_enc, b.known_dec, b.cls, b.key_mask)
        return self._buffers[(rows, length)]

    def _build(self, rows: int, length: int, fill: Fill | None) -> tuple[Callable, Callable]:
        model, buf = self.model, self.model.cfg.buffer_size
        b = self._buffers_for(rows, length)
        depth = len(model.decoder_blocks)
        pool_ref = None if fill is None else weakref.ref(fill.pool)  # units must not keep it alive
        fill_encoder = fill is not None and fill.encoder
        fill_from = depth if fill is None else fill.decoder_from

        def encoder() -> None:  # as transformer.full_pass's encoder phase
            x = model.encoder_input(b.tokens, b.known_enc, b.cls)  # (G, buffer + n, D)
            pool = pool_ref() if fill_encoder else None
            out = encoder_layers(model, x, b.key_mask, pool, b.pool_rows)
            if b.enc is None:
                b.enc = torch.empty_like(out)
            b.enc.copy_(out)

        def decoder() -> Tensor:  # as transformer.full_pass's decoder phase
            x = model.decoder_input(b.enc, b.known_dec)  # (G, buffer + L, D)
            pool = pool_ref() if pool_ref is not None else None
            return decoder_layers(model, x, fill_from, pool, b.pool_rows)[:, buf:]

        with self.building():
            if self.mode == "compile":
                encoder()  # allocates b.enc outside the compiled code (graphs: in the warm-up)
            return self.runner(encoder), self.runner(decoder)


def build_pass(model: MAR, mode: str, buckets: str | Sequence[int]) -> PassGraphs | None:
    """The transformer's units for `mode`; None means eager ("off", and "auto" off CUDA or
    where the units measure slower than eager). "compile" compiles every unit at start-up:
    on a CPU ~10 s each, so give it few buckets."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"graphs must be one of {', '.join(GRAPH_MODES)}: {mode!r}")
    device = model.class_emb.weight.device
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        log.info("transformer: eager (graphs %s on %s)", mode, device.type)
        return None
    units = PassGraphs(model, "graphs" if mode == "auto" else mode, buckets)
    if mode == "auto":
        eager_s, unit_s = measure(units)
        verdict = f"graphs {unit_s * 1e3:.2f} ms vs eager {eager_s * 1e3:.2f} ms per pass"
        log.info("transformer graphs auto: %s", verdict)
        if unit_s >= eager_s:
            return None
        units.stats.note = f"auto: {verdict}"
    units.warm()
    return units


def measure(units: PassGraphs) -> tuple[float, float]:
    """Median seconds of a one-row pass with half the tokens known: eager, then as a unit."""
    model, cfg, dev = units.model, units.model.cfg, units.device
    tokens = torch.randn(1, cfg.seq_len, cfg.token_embed_dim, device=dev)
    known = [torch.arange(cfg.seq_len // 2, device=dev)]
    cls = model.class_emb(torch.zeros(1, dtype=torch.long, device=dev))

    def eager() -> Tensor:
        return model.forward_decoder_hidden(model.forward_encoder(tokens, known[0][None], cls),
                                            known[0][None])  # fmt: skip

    hits = units.stats.hits
    result = compare(dev, eager, lambda: units(model, tokens, known, cls))
    units.stats.hits = hits  # measuring is not serving
    return result
