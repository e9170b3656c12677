"""One decoding step for any set of images, each wherever it is in its own run.

The engine under both the batch sampler (`sampler.sample_tokens`: every row at the same
step) and the worker's continuous batching (rows join and leave at every step boundary).
Each image is a `Row`: its parameters, its decoding config, its randomness, how far it has
got, and a slot in the `SlotPool` that holds its tokens and caches from admission to
release. `StepEngine.step(rows)` advances every row by one AR step of its own run:

1. schedule: each row's step (known and predicted positions), whether its transformer step
   is full (MARché refresh phase, the condition cache's phase), and which CFG halves run,
   as one `Call` per half;
2. execute: one full transformer pass for every call on a full step (any mix of modes and
   steps: known tokens padded and masked), one lazy MARché pass per MARché config, the
   condition cache's h_uncond = h_cond + diff for rows that skipped their unconditional half,
   then the head over the flat set of predicted tokens, one call per head plan (rows whose
   head schedules agree at this step share it; under FTS a row's tokens split between two
   plans by their neighbourhood's high-frequency energy), with per-token cfg and temperature.
   Each phase runs as a unit or eager, chosen in one place (`units.common.run_phase`); the eager
   passes are in `passes/`, their units in `units/`, and both return what they computed;
3. update: the passes' encoder lengths and the sampled tokens go into the pool; each row
   moves on.

Nothing a row computes depends on the other rows: attention is per row (padding is masked),
the head is per token, and each row draws from its own randomness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.decode.gtr import (
    fts_split,
    high_frequency_energy,
    structure_mask,
    two_stage_order,
)
from engine.decode.head import HeadPlan, HeadPolicy
from engine.decode.passes import head as head_pass
from engine.decode.passes.common import Call, PassOutput
from engine.decode.passes.full import full_pass
from engine.decode.passes.lazy import lazy_pass
from engine.decode.policy import DecodeConfig
from engine.decode.pool import SlotPool
from engine.decode.profiling import NULL_TIMER, NullTimer, PhaseTimer
from engine.decode.randomness import RowRandomness
from engine.decode.schedules import Step, cfg_scale
from engine.decode.units.common import DecodeUnits, run_phase
from engine.model.config import SamplingParams
from engine.model.mar import MAR


@dataclass(eq=False)
class Row:
    """One image in flight."""

    label: Tensor  # (1,) its class, on the device
    params: SamplingParams
    config: DecodeConfig
    randomness: RowRandomness
    slot: int  # its slot in the pool
    order: Tensor  # (L,) generation order; the tail is generated first
    steps: list[Step]  # the steps of its run that predict tokens
    num_steps: int  # steps of its run, counting any that predict none (the head's progress)
    cfg_scales: Tensor  # (len(steps),) guidance scale of each of those steps, on the device
    temperature: Tensor  # (1,)
    head: HeadPolicy
    done: int = 0  # steps taken
    prev_pred: Tensor | None = None  # (k,) positions predicted by the last step
    active: list[float] = field(default_factory=list)  # active-token fraction per step
    lazy_cond_steps: int = 0  # steps that skipped the unconditional half (condition cache)
    refresh_rng: torch.Generator | None = None  # MARché's "random" refresh ablation

    @property
    def guided(self) -> bool:
        return self.params.cfg != 1.0

    @property
    def finished(self) -> bool:
        return self.done == len(self.steps)

    @property
    def tokens_done(self) -> int:
        if self.done == 0:
            return 0
        last = self.steps[self.done - 1]
        return len(self.order) - last.unknown_before + last.num_pred


@dataclass(eq=False)
class _RowStep:
    """What one row does in this step, and what its passes computed per CFG half."""

    row: Row
    step: Step
    pred: Tensor  # (k,) positions predicted
    full: bool  # full transformer step (caches refilled)
    calls: list[Call]  # [conditional] or [conditional, unconditional]
    h: list = field(init=False)  # per half: (k, D) before decoder_norm
    h_all: list = field(init=False)  # per half, full steps: (L, D)
    active: list = field(init=False)  # per half: share of the tokens in the late layers

    def __post_init__(self) -> None:
        self.h, self.h_all, self.active = ([None] * len(self.calls) for _ in range(3))


Entries = list[tuple[_RowStep, int]]  # a pass's calls as (row step, CFG half)


class StepEngine:
    """Advances rows one step at a time; owns the pool their caches live in."""

    def __init__(
        self,
        model: MAR,
        capacity: int,
        device: torch.device | str | None = None,
        units: DecodeUnits | None = None,
    ) -> None:
        """`units`: the phases that run as units (`units.build.build_units`); None: eager."""
        self.model = model
        self.pool = SlotPool(model, capacity, device or model.class_emb.weight.device)
        self.units = units or DecodeUnits()

    @property
    def free_slots(self) -> int:
        return self.pool.free

    def admit(
        self, label: int | Tensor, params: SamplingParams, config: DecodeConfig, randomness
    ) -> Row:
        """A new row at step 0 in a free slot (raises `PoolFull` when there is none)."""
        seq_len, device = self.model.config.seq_len, self.pool.device
        order = randomness.order().to(device)  # drawn first, as upstream does
        if config.gtr is not None:  # GtR: the structure half first (the order's tail)
            order = two_stage_order(order, structure_mask(seq_len, device))
        plan = config.step_plan(params.num_iter, seq_len)
        steps = [s for s in plan if s.num_pred > 0]
        scales = [cfg_scale(params.cfg, params.cfg_schedule, s.mask_len, seq_len) for s in steps]
        slot = self.pool.acquire()
        self.pool.tokens[slot].zero_()
        self.pool.orders[slot].copy_(order)  # where the lazy units read positions
        row = Row(
            label=torch.as_tensor(label, device=device).reshape(1),
            params=params,
            config=config,
            randomness=randomness,
            slot=slot,
            order=order,
            steps=steps,
            num_steps=len(plan),
            cfg_scales=torch.tensor(scales, dtype=torch.float32, device=device),
            temperature=torch.full((1,), float(params.temperature), device=device),
            head=HeadPolicy(config.head),
        )
        if config.marche is not None and config.marche.refresh == "random":
            row.refresh_rng = torch.Generator(device).manual_seed(0)
        return row

    def release(self, row: Row) -> None:
        self.pool.release(row.slot)

    def tokens(self, rows: Sequence[Row]) -> Tensor:
        """(B, L, C) current tokens of `rows` (unknown positions are zero)."""
        if not rows:
            return self.pool.tokens[:0].clone()
        return torch.stack([self.pool.tokens[r.slot] for r in rows])

    @torch.no_grad()
    def step(self, rows: Sequence[Row], timer: PhaseTimer | NullTimer = NULL_TIMER) -> None:
        """Advance every (unfinished) row by one step of its own run."""
        model, pool, units = self.model, self.pool, self.units
        # 1. schedule
        work = [self._schedule(row) for row in rows]
        full: Entries = []
        lazy: dict = {}  # MarcheConfig -> its calls' entries
        for half in (0, 1):  # conditional calls first in every pass
            for w in work:
                if half < len(w.calls):
                    group = full if w.full else lazy.setdefault(w.row.config.marche, [])
                    group.append((w, half))
        # 2. execute
        if full:
            calls = [w.calls[half] for w, half in full]
            self._record(full, run_phase(units.full, full_pass, model, pool, calls, timer))
        for config, entries in lazy.items():
            calls = [w.calls[half] for w, half in entries]
            out = run_phase(units.lazy, lazy_pass, model, pool, config, calls, timer)
            self._record(entries, out)
        guidance = [self._guidance(w) for w in work]
        with timer.phase("diffusion_head"):
            self._head(work, guidance)
        # 3. update
        for w in work:
            w.row.prev_pred = w.pred
            w.row.done += 1
            w.row.active.append(sum(w.active) / len(w.active))

    def _record(self, entries: Entries, out: PassOutput) -> None:
        """A pass's outputs into its calls' row steps, and its encoder lengths into the pool
        (the one place they change)."""
        for j, ((w, half), h, active) in enumerate(zip(entries, out.h, out.active, strict=True)):
            w.h[half], w.active[half] = h, active
            if out.h_all is not None:
                w.h_all[half] = out.h_all[j]
            if out.enc_len is not None:
                self.pool.enc_len[w.calls[half].cache_row] = out.enc_len[j]

    def _schedule(self, row: Row) -> _RowStep:
        if row.finished:
            raise ValueError("row has finished its steps")
        s = row.steps[row.done]
        known = row.order[s.unknown_before :].flip(0)  # (n,) oldest first
        pred = row.order[s.unknown_before - s.num_pred : s.unknown_before]  # (k,)
        cond_cache = row.config.cond_cache if row.guided else None
        both = row.guided and (cond_cache is None or cond_cache.both_halves(row.done))
        marche = row.config.marche
        full = (
            marche is None
            or marche.budget >= self.pool.num_slots  # covers every token: exactly baseline
            or row.done % marche.refresh_period == 0
            or (cond_cache is not None and both)  # the unconditional twin's caches are stale
        )
        calls = [
            Call(
                slot=row.slot,
                cache_row=self.pool.cache_row(row.slot, half),
                label=row.label if half == 0 else None,
                known=known,
                pred=pred,
                prev_pred=row.prev_pred,
                cache_encoder=marche is not None and marche.encoder == "cache",
                cache_decoder_from=None if marche is None else marche.selection_layer,
                refresh_rng=row.refresh_rng,
            )
            for half in ((0, 1) if both else (0,))
        ]
        return _RowStep(row, s, pred, full, calls)

    def _guidance(self, w: _RowStep) -> tuple[Tensor, ...]:
        """(h_cond,) or (h_cond, h_uncond) at the predicted positions; the condition cache
        stores h_uncond - h_cond on its full steps and stands in for h_uncond on the others."""
        if not w.row.guided:
            return (w.h[0],)
        if len(w.calls) == 2:
            if w.row.config.cond_cache is not None:
                self.pool.diff(w.h_all[1])[w.row.slot] = w.h_all[1] - w.h_all[0]
            return w.h[0], w.h[1]
        w.row.lazy_cond_steps += 1
        diff = self.pool.diff(w.h[0])[w.row.slot]  # (L, D)
        return w.h[0], w.h[0] + diff[w.pred]

    def _head(self, work: list[_RowStep], guidance: list[tuple[Tensor, ...]]) -> None:
        """Sample every predicted token, one head call per (head plan, guided) group: a row
        step's tokens share its plan, or under FTS split between two plans."""
        model, pool = self.model, self.pool
        seq_len = model.config.seq_len
        groups: dict[tuple, tuple] = {}
        for w, h in zip(work, guidance, strict=True):
            noise = w.row.randomness.noise(w.step.index, w.pred)  # one draw per row step
            for plan, part in self._head_parts(w):
                entry = _HeadPart(w, h, noise, part)
                groups.setdefault((plan.key, w.row.guided), (plan, []))[1].append(entry)
        for (_, guided), (plan, parts) in groups.items():
            pos = torch.cat([p.pred for p in parts])[None]  # (1, K) every token of the group
            halves = (0, 1) if guided else (0,)
            z = torch.cat(  # (K, D), or (2K, D) = [cond; uncond]
                [
                    model.decoder_output_at(torch.cat([p.h(i) for p in parts])[None], pos)[0]
                    for i in halves
                ]
            )
            x_T = torch.cat([p.x_T for p in parts]).float()  # (K, C)
            step_noise = torch.cat([p.step_noise for p in parts], dim=1).float()  # (T, K, C)
            temperature = torch.cat([p.w.row.temperature.expand(len(p.pred)) for p in parts])
            cfg = None
            if guided:
                cfg = torch.cat([p.cfg_scale.expand(len(p.pred)) for p in parts])[:, None]
            x0 = run_phase(self.units.head, head_pass.sample, model.diffloss, plan, z, x_T,
                           step_noise, temperature[:, None], cfg)  # fmt: skip
            flat = torch.cat([p.w.row.slot * seq_len + p.pred for p in parts])
            tokens = pool.tokens.view(-1, pool.tokens.shape[-1])
            tokens.index_copy_(0, flat, x0.to(tokens.dtype))

    def _head_parts(self, w: _RowStep) -> list[tuple[HeadPlan, Tensor | None]]:
        """(plan, local indices into w.pred, None for all) of a row step's head work: one
        plan, or under FTS the high-energy tokens' and the others'."""
        row, head = w.row, self.model.diffloss
        fts = row.config.fts
        stage = 1 if row.config.gtr is not None else 0  # FTS needs known neighbours
        if fts is None or w.step.stage != stage or row.done == 0 or len(w.pred) < 2:
            return [(row.head.plan(head, w.step.index, row.num_steps), None)]
        num_high = fts.high_count(len(w.pred))
        known = torch.zeros(len(row.order), dtype=torch.bool, device=row.order.device)
        known.index_fill_(0, row.order[w.step.unknown_before :], True)
        energy = high_frequency_energy(self.pool.tokens[row.slot], known)
        high, low = fts_split(energy, w.pred, num_high)
        parts = [(fts.high, high), (fts.low, low)]
        return [
            (row.head.plan(head, w.step.index, row.num_steps, scale), part)
            for scale, part in parts
            if len(part)
        ]


@dataclass(eq=False)
class _HeadPart:
    """The tokens of one row step that share a head plan, and their noise."""

    w: _RowStep
    guidance: tuple[Tensor, ...]  # (h_cond,) or (h_cond, h_uncond), (k, D) each
    noise: tuple[Tensor, Tensor]  # the row step's x_T (k, C) and step noise (T, k, C)
    part: Tensor | None  # local indices into w.pred; None: all of them

    @property
    def pred(self) -> Tensor:
        return self.w.pred if self.part is None else self.w.pred[self.part]

    def h(self, half: int) -> Tensor:
        h = self.guidance[half]
        return h if self.part is None else h[self.part]

    @property
    def cfg_scale(self) -> Tensor:
        return self.w.row.cfg_scales[self.w.row.done]

    @property
    def x_T(self) -> Tensor:
        return self.noise[0] if self.part is None else self.noise[0][self.part]

    @property
    def step_noise(self) -> Tensor:
        return self.noise[1] if self.part is None else self.noise[1][:, self.part]
