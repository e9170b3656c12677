"""The transformer's full pass as two units (encoder, decoder) per (row bucket, known-token
bucket) (modes: `graphs.py`).

A full pass without cache fills (exact MAR's every step) has ragged shapes: G rows (CFG
halves), each with its own number of known tokens. Padded to a row bucket and a known-token
bucket (every L/8 tokens by default), with pad tokens masked out of the encoder's attention
and scattered into the decoder's scratch slot as the eager pass does, it becomes a fixed
computation over static buffers: the encoder (embedding, blocks, norm) and the decoder
(scatter into mask tokens, blocks). Passes that fill MARché's caches, and shapes above the
largest buckets, run eager (counted as misses).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.decode.graphs import GRAPH_MODES, Units, bucket_for, compare, log, parse_buckets
from engine.decode.profiling import NULL_TIMER, NullTimer, PhaseTimer
from engine.decode.transformer import pad
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


class PassGraphs(Units):
    """Runs full passes without cache fills as units; `__call__` returns None when none
    serves the pass (the caller runs it eager)."""

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
        self._units: dict[tuple[int, int], tuple[_Buffers, Callable, Callable]] = {}

    def __call__(
        self,
        model: MAR,
        tokens: Tensor,
        known: list[Tensor],
        cls: Tensor,
        timer: PhaseTimer | NullTimer = NULL_TIMER,
    ) -> Tensor | None:
        """(G, L, D) hidden states before decoder_norm for G rows (tokens (G, L, C), known
        positions per row, class embeddings (G, D)), or None: run it eager."""
        g, n = len(known), max(len(k) for k in known)
        rows, length = bucket_for(g, self.buckets), bucket_for(max(n, 1), self.lengths)
        unit = None
        if model is self.model and rows is not None and length is not None:
            unit = self._units.get((rows, length))
            if unit is None and self.mode != "compile":  # never compile while serving
                unit = self._build(rows, length)
        if unit is None:
            self.stats.misses += 1
            return None
        buffers, encoder, decoder = unit
        buffers.load(tokens, known, cls, model.cfg.seq_len)
        self.stats.hits += 1
        self.stats.padded_rows += rows - g
        with timer.phase("encoder"):
            encoder()
        with timer.phase("decoder"):
            return decoder()[:g].clone()  # the next run overwrites its output

    def warm(self, buckets: Sequence[int] | None = None) -> None:
        """Build every (rows, length) unit of these row buckets (default: all) now, largest
        first, and log time and memory."""
        started = time.perf_counter()
        for rows in reversed(buckets or self.buckets):
            for length in reversed(self.lengths):
                if (rows, length) not in self._units:
                    self._build(rows, length)
        self.log_built("transformer", len(self._units), time.perf_counter() - started)

    def _build(self, rows: int, length: int) -> tuple:
        started = time.perf_counter()
        model, dev, cfg = self.model, self.device, self.model.cfg
        buf = cfg.buffer_size
        key_mask = torch.zeros(rows, buf + length, dtype=torch.bool, device=dev)
        key_mask[:, :buf] = True
        b = _Buffers(
            tokens=torch.zeros(rows, cfg.seq_len, cfg.token_embed_dim, device=dev),
            known_enc=torch.zeros(rows, length, dtype=torch.long, device=dev),
            known_dec=torch.full((rows, length), cfg.seq_len, dtype=torch.long, device=dev),
            cls=torch.zeros(rows, cfg.encoder_embed_dim, device=dev),
            key_mask=key_mask,
        )

        def encoder() -> None:
            x = model.encoder_input(b.tokens, b.known_enc, b.cls)  # (G, buffer + n, D)
            for block in model.encoder_blocks:
                x = block(x, b.key_mask)
            out = model.encoder_norm(x)
            if b.enc is None:
                b.enc = torch.empty_like(out)
            b.enc.copy_(out)

        def decoder() -> Tensor:
            x = model.decoder_input(b.enc, b.known_dec)  # (G, buffer + L, D)
            for block in model.decoder_blocks:
                x = block(x)
            return x[:, buf:]

        if self.mode == "compile":
            encoder()  # allocates b.enc outside the compiled code (graphs: in the warm-up)
        run_encoder = self.runner(encoder)
        unit = (b, run_encoder, self.runner(decoder))
        self.count_buffers(b.tokens, b.known_enc, b.known_dec, b.cls, b.key_mask, b.enc)
        self._units[(rows, length)] = unit
        self.stats.built += 1
        self.stats.build_seconds += time.perf_counter() - started
        return unit


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
