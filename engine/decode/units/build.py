"""Building a model's units for a mode (`units/common.py`), and the "auto" measurement.

`build_units` gives a `DecodeUnits` with each phase's family, or None where it runs eager:
"off" builds nothing; "auto" builds CUDA graphs only on CUDA, and keeps a family only if one
of its units measures faster than the eager pass on this device; "static", "compile" and
"cuda-graphs" build what they name. The head's units of the presets' constant plans, and
the full passes that fill nothing, are built now (largest bucket first, time and memory
logged, as vLLM does); units bound to a step engine's pool are built on first use.

Buckets "auto" (`sized_buckets`) are sized by the batch a service admits, so that no call of
such a batch runs eager. A transformer pass runs both CFG halves of each image as calls: at
most 2 x max_batch_size. A head call runs the tokens its images predict in one step (grouped
by head plan; FTS splits a step's tokens into two calls): at most max_batch_size x the most
tokens any mode predicts in one step of the model's default run. GtR's reconstruction steps
are the big ones: MAR-B's 256 tokens in 64 steps predict at most 7 a step under MAR's cosine
schedule, 24 under turbo + GtR (S 1/2, K 8), whose reconstruction half is 128 tokens in 8
steps. Requests with fewer steps than the default predict more a step; their larger calls
run eager and count as misses (`UnitStats`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from engine.decode.head import HeadPlan, HeadPolicy
from engine.decode.passes import head as head_pass
from engine.decode.passes.common import Call
from engine.decode.passes.full import full_pass
from engine.decode.policy import DecodeConfig
from engine.decode.pool import SlotPool
from engine.decode.units.common import UNITS_MODES, DecodeUnits, compare, log
from engine.decode.units.full import PASS_BUCKETS, FullUnits
from engine.decode.units.head import HEAD_BUCKETS, HeadUnits
from engine.decode.units.lazy import LazyUnits
from engine.model.diffloss import DiffLoss
from engine.model.mar import MAR

AUTO = "auto"  # the buckets setting that sizes them (`sized_buckets`)


def build_units(
    model: MAR,
    mode: str,
    configs: Sequence,
    head_buckets: str | Sequence[int] = HEAD_BUCKETS,
    pass_buckets: str | Sequence[int] = PASS_BUCKETS,
    guided: Sequence[bool] = (True, False),
) -> DecodeUnits | None:
    """The units of `model` for `mode` (`UNITS_MODES`); None: every phase eager. The head's
    are built for `configs`' plans and `guided` (cfg != 1) rows, unguided ones, or both."""
    if mode not in UNITS_MODES:
        raise ValueError(f"units must be one of {', '.join(UNITS_MODES)}: {mode!r}")
    device = model.class_emb.weight.device
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        log.info("units: none, every phase eager (units %s on %s)", mode, device.type)
        return None
    full = build_full(model, mode, pass_buckets)
    units = DecodeUnits(head=build_head(model.diffloss, mode, head_buckets, configs, guided))
    if full is not None:
        units.full, units.lazy = full, lazy_twin(full)
    return units if units.head or units.full else None


def transformer_units(
    model: MAR,
    mode: str,
    buckets: str | Sequence[int] = PASS_BUCKETS,
    lengths: str | Sequence[int] | None = None,
) -> DecodeUnits:
    """The transformer passes' units (full and lazy) in a built mode, none built yet: each is
    built on first use, or by `full.warm()`."""
    full = FullUnits(model, mode, buckets, lengths)
    return DecodeUnits(full=full, lazy=lazy_twin(full))


def lazy_twin(full: FullUnits) -> LazyUnits:
    """MARché's lazy passes' units with the full pass's buckets and CUDA graph pool."""
    return LazyUnits(full.model, full.mode, full.buckets, full.lengths, full.graph_pool)


def build_head(
    head: DiffLoss,
    mode: str,
    buckets: str | Sequence[int],
    configs: Sequence,
    guided: Sequence[bool] = (True, False),
) -> HeadUnits | None:
    """The head's units (None: eager). "auto" keeps CUDA graphs only if a guided call at the
    smallest bucket measures faster than eager (inductor takes ~10-25 s per plan and bucket
    on a CPU: a start-up cost, not a default)."""
    plans = head_plans(head, configs)
    units = HeadUnits(head, "cuda-graphs" if mode == "auto" else mode, buckets)
    if mode == "auto":
        eager_s, unit_s = measure_head(units, plans[0], units.buckets[0])
        verdict = f"graphs {unit_s * 1e3:.2f} ms vs eager {eager_s * 1e3:.2f} ms per call"
        log.info("head units auto: %s", verdict)
        if unit_s >= eager_s:
            return None
        units.stats.note = f"auto: {verdict}"
    units.warm(plans, guided)
    return units


def build_full(model: MAR, mode: str, buckets: str | Sequence[int]) -> FullUnits | None:
    """The full pass's units (None: eager). "auto" keeps CUDA graphs only if they measure
    faster than eager; "compile" compiles every unit now: on a CPU ~10 s each, so give it
    few buckets."""
    units = FullUnits(model, "cuda-graphs" if mode == "auto" else mode, buckets)
    if mode == "auto":
        eager_s, unit_s = measure_full(units)
        verdict = f"graphs {unit_s * 1e3:.2f} ms vs eager {eager_s * 1e3:.2f} ms per pass"
        log.info("full pass units auto: %s", verdict)
        if unit_s >= eager_s:
            return None
        units.stats.note = f"auto: {verdict}"
    units.warm()
    return units


def head_plans(head: DiffLoss, configs: Sequence) -> list[HeadPlan]:
    """The plans worth building at start-up: each config's plan at step 0 when its head
    schedule is constant (the same plan every step; annealed ones change per step)."""
    plans: dict[tuple, HeadPlan] = {}
    for config in configs:
        if config.head.schedule != "constant":
            continue
        plan = HeadPolicy(config.head).plan(head, 0, 2)
        plans.setdefault(plan.key, plan)
    return list(plans.values())


def measure_head(units: HeadUnits, plan: HeadPlan, rows: int) -> tuple[float, float]:
    """Median seconds of one guided head call of `rows` rows: eager, then as a unit."""
    net, dev = units.head.net, units.device
    steps = units.head.gen_schedule.num_timesteps
    z = torch.randn(2 * rows, net.cond_embed.in_features, device=dev)
    x_T = torch.randn(rows, net.in_channels, device=dev)
    noise = torch.randn(steps, rows, net.in_channels, device=dev)
    temperature, cfg = torch.ones(rows, 1, device=dev), torch.full((rows, 1), 3.0, device=dev)
    args = (units.head, plan, z, x_T, noise, temperature, cfg)
    return compare(dev, lambda: head_pass.sample(*args), lambda: units.run(*args))


def measure_full(units: FullUnits) -> tuple[float, float]:
    """Median seconds of a one-call full pass with half the tokens known (filling no cache):
    eager, then as a unit."""
    model, config, dev = units.model, units.model.config, units.device
    pool = SlotPool(model, 1, dev)
    pool.tokens.normal_()
    label = torch.zeros(1, dtype=torch.long, device=dev)
    known = torch.arange(config.seq_len // 2, device=dev)
    pred = torch.arange(config.seq_len // 2, config.seq_len, device=dev)
    calls = [Call(slot=0, cache_row=0, label=label, known=known, pred=pred)]

    def eager() -> Tensor:
        return full_pass(model, pool, calls).h[0]

    return compare(dev, eager, lambda: units.run(model, pool, calls).h[0])


def powers_of_two(upto: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the first power of two >= `upto`."""
    if upto < 1:
        raise ValueError(f"a bucket holds at least 1, not {upto}")
    sizes = [1]
    while sizes[-1] < upto:
        sizes.append(2 * sizes[-1])
    return tuple(sizes)


def most_tokens_per_step(seq_len: int, num_iter: int, configs: Iterable[DecodeConfig]) -> int:
    """The most tokens one image predicts in one step of a `num_iter` run, over `configs`
    (GtR's two stages where a config has them)."""
    return max(s.num_pred for config in configs for s in config.step_plan(num_iter, seq_len))


def sized_buckets(
    seq_len: int, num_iter: int, max_batch_size: int, configs: Iterable[DecodeConfig]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(head buckets, pass buckets) that hold every call of a batch of `max_batch_size`
    images of any of `configs` at `num_iter` steps."""
    head_rows = max_batch_size * most_tokens_per_step(seq_len, num_iter, configs)
    return powers_of_two(head_rows), powers_of_two(2 * max_batch_size)
