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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.decode.head import HeadPolicy
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


def _flat_slots(slots: Tensor, num_slots: int) -> Tensor:
    """(B, n) slots -> (B*n,) row-major indices into a (B*N, ...) view of a cache."""
    rows = torch.arange(len(slots), device=slots.device)[:, None]
    return (rows * num_slots + slots).flatten()


class Marche:
    """The MARché decoding policy (see module docstring). One instance per batch run."""

    name = "marche"

    def __init__(
        self, config: MarcheConfig | None = None, seed: int = 0, head: HeadPolicy | None = None
    ) -> None:
        self.config = config or MarcheConfig()
        self.head = head or HeadPolicy()
        self.seed = seed  # only the "random" refresh ablation draws from it
        self.stats: list[float] = []  # active-token fraction of each step (1.0 on full steps)

    def begin(self, model: MAR, batch_size: int, num_iter: int) -> None:
        if self.config.selection_layer > len(model.decoder_blocks):
            raise ValueError(
                f"selection_layer {self.config.selection_layer} > decoder depth "
                f"{len(model.decoder_blocks)}"
            )
        self.dec_cache: list[tuple[Tensor, Tensor]] | None = None
        self.enc_cache: list[tuple[Tensor, Tensor]] | None = None
        self.enc_out: Tensor | None = None
        self.enc_len = 0  # slots of enc_out / the encoder caches that are filled
        self.prev_pred: Tensor | None = None
        self.num_calls = 0
        self.full = True
        self.stats = []
        self.generator: torch.Generator | None = None

    # -- the policy protocol -------------------------------------------------------------------

    def encode(
        self,
        model: MAR,
        step: int,
        tokens: Tensor,
        known_idx: Tensor,
        class_embedding: Tensor,
        force_full: bool = False,
    ) -> Tensor:
        # A full step refills every cache: the first call, every refresh_period-th call, a
        # forced one, or any call whose budget covers all tokens anyway (then MARché is
        # exactly baseline). Calls may pass a leading subset of the rows the caches were
        # allocated for (the condition cache runs the conditional half alone).
        covers_all = self.config.budget >= model.cfg.buffer_size + model.cfg.seq_len
        periodic = self.num_calls % self.config.refresh_period == 0
        self.full = force_full or covers_all or periodic
        self.num_calls += 1
        return self._encoder(model, tokens, known_idx, class_embedding, self.full)

    def decode(
        self,
        model: MAR,
        step: int,
        enc: Tensor,
        known_idx: Tensor,
        pred_idx: Tensor,
        all_positions: bool = False,
    ) -> Tensor:
        if all_positions and not self.full:
            raise ValueError("hidden states at every position exist on full steps only")
        x = model.decoder_input(enc, known_idx)  # (B', buffer + L, D)
        h = self._decoder(model, x, pred_idx, self.full, all_positions)
        self.prev_pred = pred_idx
        return h

    def select(self, rows: Tensor) -> None:
        """Retire rows: every per-batch cache keeps only `rows` (B' indexing, both CFG halves)."""

        def pick(caches: list[tuple[Tensor, Tensor]] | None) -> list[tuple[Tensor, Tensor]] | None:
            return None if caches is None else [(k[rows], v[rows]) for k, v in caches]

        self.dec_cache, self.enc_cache = pick(self.dec_cache), pick(self.enc_cache)
        if self.enc_out is not None:
            self.enc_out = self.enc_out[rows]
        if self.prev_pred is not None:  # a conditional-only step left the leading rows only
            self.prev_pred = self.prev_pred[rows[rows < len(self.prev_pred)]]

    # -- encoder ----------------------------------------------------------------------------------

    def _encoder(
        self, model: MAR, tokens: Tensor, known_idx: Tensor, class_embedding: Tensor, full: bool
    ) -> Tensor:
        """Encoder output for buffer + known tokens, in slot order = generation order."""
        if self.config.encoder == "full":
            return model.forward_encoder(tokens, known_idx, class_embedding)
        buf, rows = model.cfg.buffer_size, len(tokens)
        if full or self.enc_out is None:
            x = model.encoder_input(tokens, known_idx, class_embedding)
            num_slots = buf + model.cfg.seq_len
            if self.enc_cache is None:  # once per run; full steps overwrite in place
                self.enc_cache = self._alloc(model.encoder_blocks, x, num_slots)
            n = x.shape[1]
            for block, (k, v) in zip(model.encoder_blocks, self.enc_cache, strict=True):
                x = block.forward_fill(x, k[:rows, :n], v[:rows, :n])
            out = model.encoder_norm(x)
            if self.enc_out is None:
                self.enc_out = out.new_empty(len(out), num_slots, out.shape[-1])
            self.enc_out[:rows, :n] = out
            self.enc_len = n
            return out
        # append-only: tokens generated since the last call are the last columns of known_idx
        start, end = self.enc_len, buf + known_idx.shape[1]
        new_idx = known_idx[:, start - buf :]
        x = model.embed_known(tokens, new_idx)  # the new tokens only
        for block, (k, v) in zip(model.encoder_blocks, self.enc_cache, strict=True):
            x = block.forward_prefix(x, start, k[:rows], v[:rows])
        self.enc_out[:rows, start:end] = model.encoder_norm(x)
        self.enc_len = end
        return self.enc_out[:rows, :end]

    def _alloc(self, blocks, x: Tensor, num_slots: int) -> list[tuple[Tensor, Tensor]]:
        """Per-layer token-major K/V caches (B', N, H, hd), allocated once per run."""
        if len(blocks) == 0:
            return []
        attn = blocks[0].attn
        shape = (len(x), num_slots, attn.num_heads, attn.head_dim)
        device = x.device.type  # K/V come out of qkv in the autocast dtype, if any
        autocast = device != "meta" and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        return [(x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype)) for _ in blocks]

    # -- decoder ----------------------------------------------------------------------------------

    def _decoder(
        self, model: MAR, x: Tensor, pred_idx: Tensor, full: bool, all_positions: bool
    ) -> Tensor:
        """Hidden states before decoder_norm at pred_idx (or every image position)."""
        cfg, buf = self.config, model.cfg.buffer_size
        num_slots, rows = x.shape[1], len(x)
        blocks = model.decoder_blocks
        sel = cfg.selection_layer
        gen_slots = buf + pred_idx  # (B', k)
        for block in blocks[: sel - 1]:
            x = block(x)
        late = blocks[sel:]
        if full or self.dec_cache is None:  # no selection on a full step: skip the scoring
            x = blocks[sel - 1](x)
            if self.dec_cache is None:
                self.dec_cache = self._alloc(late, x, num_slots)
            for block, (k, v) in zip(late, self.dec_cache, strict=True):
                x = block.forward_fill(x, k[:rows], v[:rows])
            self.stats.append(1.0)
            return x[:, buf:] if all_positions else gather_tokens(x, gen_slots)

        x, scores = blocks[sel - 1].forward_scored(x, gen_slots)
        active = self._active_slots(scores, gen_slots, buf)  # (B', n_active), generating first
        self.stats.append(active.shape[1] / num_slots)
        flat = _flat_slots(active, num_slots)
        x = gather_tokens(x, active)
        for block, (k, v) in zip(late, self.dec_cache, strict=True):
            x = block.forward_active(x, flat, k[:rows], v[:rows])
        return x[:, : pred_idx.shape[1]]  # the generating tokens come first

    def _active_slots(self, scores: Tensor, gen_slots: Tensor, buf: int) -> Tensor:
        """[generating | caching | refreshing] slots per row: distinct, static count."""
        cfg = self.config
        forced = [gen_slots]
        if cfg.caching_tokens and self.prev_pred is not None:
            forced.append(buf + self.prev_pred[: len(gen_slots)])
        forced_slots = torch.cat(forced, dim=1)  # (B', f) distinct: disjoint position sets
        num_refresh = max(0, cfg.budget - forced_slots.shape[1])
        num_refresh = min(num_refresh, scores.shape[1] - forced_slots.shape[1])
        if num_refresh == 0:
            return forced_slots
        if cfg.refresh == "random":
            if self.generator is None:
                self.generator = torch.Generator(scores.device).manual_seed(self.seed)
            scores = torch.rand(scores.shape, generator=self.generator, device=scores.device)
        elif cfg.refresh == "low_attention":
            scores = -scores
        scores = scores.scatter(1, forced_slots, float("-inf"))  # never pick forced ones twice
        refresh = scores.topk(num_refresh, dim=1).indices  # (B', K)
        return torch.cat([forced_slots, refresh], dim=1)
