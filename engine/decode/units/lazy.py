"""MARché's lazy pass as two units (append encoder, cache-aware decoder) per bucket: the twin
of `passes/lazy.py` (modes: `units/common.py`).

Two of every three MARché steps are lazy (`passes.lazy.lazy_pass`): the tokens known since a call's
last call go through the append-only encoder cache, the decoder runs its first layers in full,
scores, and pushes only the active tokens (generating, caching, top-K refreshing) through
its late layers. Eager, the positions of each row (new tokens, slots, active sets, masks) are
built per row, so a lazy step launches hundreds of small ops, and its shapes follow every
row's counts. Here they are computed on the device instead, from a host-side plan of seven
integers per call (`CallPlan`) copied in one transfer, and the image's generation order, which the
slot pool holds: every index is a slice of it (the known tokens are the order's tail,
reversed; this step's generating tokens and last step's caching tokens are one run of it).

Padded to a bucket of calls (1..32), appended tokens (powers of two), known tokens (every L/8)
and active tokens (powers of two), a lazy pass is a fixed computation:

* the **append unit** (calls, appended, known): embed the new tokens, append their K/V in each
  encoder layer, attend over each row's cache prefix (pad keys masked), store the outputs;
* the **decoder unit** (calls, known, active, selection layer, refresh rule): scatter the cached
  encoder outputs into the mask tokens, full layers up to the selection layer, score, take
  each row's [forced | top-r refreshing | pad] active set, and the late layers over it.

Pad appended and active tokens repeat a real one of their row (the same K/V to the same slot);
pad rows write to the pool's scratch row. Both units write the pool's caches, so they are
bound to their pool as the refill units are, and built on first use (never compiled while
serving: under "compile" lazy passes stay eager). Passes outside the buckets, the "random"
refresh ablation and the "full" encoder ablation run eager, counted as misses.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from engine.decode.marche import MarcheConfig
from engine.decode.passes.common import Call, PassOutput
from engine.decode.passes.lazy import (
    active_layers,
    append_layers,
    refresh_candidates,
    scored_layers,
)
from engine.decode.pool import SlotPool, to_device
from engine.decode.profiling import NULL_TIMER, NullTimer, PhaseTimer
from engine.decode.units.common import Units, bucket_for
from engine.model.mar import MAR


class CallPlan(NamedTuple):
    """What a lazy pass needs to know of one call, copied to the device as one (G, 7) tensor."""

    slot: int  # its image's slot: tokens and order
    cache_row: int  # this CFG half's caches
    known: int  # n: known tokens (the order's last n, reversed)
    generating: int  # k: predicted this step, order[L-n-k : L-n]
    caching: int  # c: predicted last step, not yet cached, order[L-n : L-n+c]
    start: int  # encoder cache length before this pass (buffer + tokens appended so far)
    refresh: int  # r: top-scored tokens refreshed, up to the budget

    @property
    def active(self) -> int:
        return self.generating + self.caching + self.refresh


def powers_of_two(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `limit`, then `limit`."""
    return tuple(1 << i for i in range(limit.bit_length()) if 1 << i < limit) + (limit,)


class LazyUnits(Units):
    """Runs MARché's lazy passes (`passes.lazy.lazy_pass`'s arguments) as units."""

    def __init__(
        self,
        model: MAR,
        mode: str,
        buckets: Sequence[int],
        lengths: Sequence[int],
        graph_pool=None,
        max_units: int = 256,
    ) -> None:
        super().__init__(mode, model.class_emb.weight.device, buckets, graph_pool)
        config = model.config
        self.model, self.buckets, self.lengths = model, self.stats.buckets, tuple(lengths)
        self.num_slots, self.max_units = config.buffer_size + config.seq_len, max_units
        self.appended = powers_of_two(config.seq_len)  # tokens a call appends to its encoder cache
        self.actives = powers_of_two(self.num_slots)  # tokens through the late layers
        self._plans: dict[int, Tensor] = {}  # rows -> (rows, 7) CallPlans on the device
        self._planned: tuple | None = None  # (calls, their plans and buckets) from can_run
        self._enc: dict[tuple[int, int], Tensor] = {}  # (rows, known) -> encoder outputs
        self._units: weakref.WeakKeyDictionary[SlotPool, dict] = weakref.WeakKeyDictionary()

    def can_run(
        self,
        model: MAR,
        pool: SlotPool,
        config: MarcheConfig,
        calls: list[Call],
        timer: object = NULL_TIMER,
    ) -> bool:
        """Buckets hold the calls, the knobs are served (not the "random" refresh or "full"
        encoder ablations), and both units exist or may be built now."""
        served = model is self.model and config.encoder == "cache" and config.refresh != "random"
        if not served:
            return False
        self._planned = (calls, self._sizes(pool, config, calls))  # for the run that follows
        sizes = self._planned[1][1]
        return None not in sizes and self._can_build(pool, config, *sizes)

    def run(
        self,
        model: MAR,
        pool: SlotPool,
        config: MarcheConfig,
        calls: list[Call],
        timer: PhaseTimer | NullTimer = NULL_TIMER,
    ) -> PassOutput:
        """`passes.lazy.lazy_pass` of `calls` (positions cut from their slot's order as the
        step engine cuts them) as units."""
        buf = model.config.buffer_size
        planned, self._planned = self._planned, None
        # `run_phase` hands can_run and run the same list: its plan is made once (on a CPU,
        # ~1 ms for 256 calls)
        fresh = planned is None or planned[0] is not calls
        plan, sizes = self._sizes(pool, config, calls) if fresh else planned[1]
        rows = sizes[0]
        pad = CallPlan(0, pool.scratch, known=1, generating=1, caching=0, start=buf, refresh=0)
        values = [v for p in plan + [pad] * (rows - len(plan)) for v in p]
        self._plan(rows).copy_(to_device(values, self.device).view(rows, len(CallPlan._fields)))
        self.stats.padded_rows += rows - len(calls)
        append_key, decoder_key = self._keys(config, *sizes)
        with timer.phase("encoder"):
            self._unit(pool, append_key)()
        with timer.phase("decoder"):
            x = self._unit(pool, decoder_key)()  # (G, A, D)
            x = x[: len(calls), : max(p.generating for p in plan)].clone()  # (G, k, D)
        return PassOutput(
            h=[h[: p.generating] for p, h in zip(plan, x, strict=True)],
            active=[p.active / self.num_slots for p in plan],
            enc_len=[buf + p.known for p in plan],
        )

    def _sizes(self, pool: SlotPool, config: MarcheConfig, calls: list[Call]) -> tuple:
        """Each call's plan, and the buckets (calls, appended, known, active tokens) that
        hold them (None above the largest)."""
        buf = self.model.config.buffer_size
        plan = [self._call_plan(pool, config, c) for c in calls]
        sizes = (
            bucket_for(len(calls), self.buckets),
            bucket_for(max(buf + p.known - p.start for p in plan), self.appended),
            bucket_for(max(p.known for p in plan), self.lengths),
            bucket_for(max(p.active for p in plan), self.actives),
        )
        return plan, sizes

    @property
    def bound_pools(self) -> int:
        """Slot pools that units are bound to (each gone with its pool)."""
        return len(self._units)

    def _call_plan(self, pool: SlotPool, config: MarcheConfig, c: Call) -> CallPlan:
        caching = len(c.prev_pred) if config.caching_tokens and c.prev_pred is not None else 0
        refresh = max(0, min(config.budget, self.num_slots) - len(c.pred) - caching)
        start = pool.enc_len[c.cache_row]
        return CallPlan(c.slot, c.cache_row, len(c.known), len(c.pred), caching, start, refresh)

    @staticmethod
    def _keys(config: MarcheConfig, rows: int, appended: int, known: int, active: int):
        return (
            ("append", rows, appended, known),
            ("decoder", rows, known, active, config.selection_layer, config.refresh),
        )

    def _can_build(self, pool: SlotPool, config: MarcheConfig, *sizes: int) -> bool:
        """Both units exist, or may be built now: never compiled while serving, and at most
        `max_units` alive (those of pools gone are gone)."""
        missing = [k for k in self._keys(config, *sizes) if k not in self._units.get(pool, {})]
        if not missing:
            return True
        alive = sum(len(units) for units in self._units.values())
        return self.mode != "compile" and alive + len(missing) <= self.max_units

    def _unit(self, pool: SlotPool, key: tuple) -> Callable:
        """The unit of `key` for `pool`, built now if missing: on this pass's plan, after the
        append unit has run (a capture's warm-up runs the unit, which writes the pool)."""
        units = self._units.setdefault(pool, {})
        if key not in units:
            computation = self._append_fn if key[0] == "append" else self._decoder_fn
            with self.building():
                units[key] = self.runner(computation(pool, *key[1:]))
        return units[key]

    def _plan(self, rows: int) -> Tensor:
        if rows not in self._plans:
            shape = (rows, len(CallPlan._fields))
            self._plans[rows] = torch.zeros(shape, dtype=torch.long, device=self.device)
            self.count_buffers(self._plans[rows])
        return self._plans[rows]

    def _append_fn(self, pool: SlotPool, rows: int, appended: int, known: int) -> Callable:
        """The append unit's computation over the plan of `rows` rows."""
        model, dev = self.model, self.device
        buf, seq_len, num_slots = model.config.buffer_size, model.config.seq_len, self.num_slots
        plan, pool_ref, enc_key = self._plan(rows), weakref.ref(pool), (rows, known)

        def append() -> None:  # as passes.lazy._append_encoder
            pool = pool_ref()
            slot, cache_row, n, _, _, start, _ = plan.unbind(1)  # each (G,)
            order = pool.orders[slot]  # (G, L); known token j is order[L - 1 - j]
            t = torch.arange(appended, device=dev)[None]  # (1, m)
            t = torch.where(t < (buf + n - start)[:, None], t, 0)  # pads repeat the first
            new = order.gather(1, seq_len - 1 - (start - buf)[:, None] - t)  # (G, m)
            flat = (cache_row * num_slots + start)[:, None] + t  # (G, m) cache row * N + slot
            end = buf + known
            key_mask = torch.arange(end, device=dev)[None] < (buf + n)[:, None]  # (G, end)
            x = model.embed_known(pool.tokens[slot], new)  # (G, m, D)
            enc_out = append_layers(model, pool, x, flat.flatten(), cache_row, end, key_mask)
            if enc_key not in self._enc:
                self._enc[enc_key] = enc_out.new_empty(rows, end, enc_out.shape[-1])
                self.count_buffers(self._enc[enc_key])
            self._enc[enc_key].copy_(enc_out[cache_row, :end])  # (G, buf + n, D)

        return append

    def _decoder_fn(
        self, pool: SlotPool, rows: int, known: int, active: int, selection_layer: int, rule: str
    ) -> Callable:
        """The decoder unit's computation over the plan of `rows` rows."""
        model, dev = self.model, self.device
        buf, seq_len, num_slots = model.config.buffer_size, model.config.seq_len, self.num_slots
        plan, pool_ref, enc_key = self._plan(rows), weakref.ref(pool), (rows, known)
        config = MarcheConfig(selection_layer=selection_layer, refresh=rule)

        def decoder() -> Tensor:  # as passes.lazy.lazy_pass's decoder phase
            pool = pool_ref()
            slot, cache_row, n, k, c, _, r = plan.unbind(1)  # each (G,)
            order = pool.orders[slot]  # (G, L)
            j = torch.arange(known, device=dev)[None]  # (1, n)
            known_idx = order.gather(1, (seq_len - 1 - j).expand(rows, -1))  # (G, n)
            known_idx = torch.where(j < n[:, None], known_idx, seq_len)  # pads: scratch slot
            x = model.decoder_input(self._enc[enc_key], known_idx)  # (G, buf + L, D)
            a = torch.arange(active, device=dev)[None]  # (1, A)
            f = (k + c)[:, None]  # forced: generating, then caching: order[L-n-k : L-n+c]
            forced = buf + order.gather(1, (seq_len - n - k)[:, None] + torch.where(a < f, a, 0))
            x, scores = scored_layers(model, config, x, forced, a < k[:, None])
            top = refresh_candidates(scores, forced, rule).topk(active, dim=1).indices  # (G, A)
            pick = torch.where(a < f, a, torch.where(a < f + r[:, None], active + a - f, 0))
            slots = torch.cat([forced, top], dim=1).gather(1, pick)  # (G, A)
            flat = (slots + (cache_row * num_slots)[:, None]).flatten()  # (G*A,)
            return active_layers(model, pool, config, x, slots, flat, cache_row)  # (G, A, D)

        return decoder
