"""The diffusion head as one unit per (plan, guided, row bucket) (modes: `graphs.py`).

A head call is T diffusion steps of about 14 + 6 x depth small ops each (digits: 1,189 ops per
AR step at batch 1, MAR-B 4,751). Once its plan (schedule, head-cache steps) is fixed, it is a
pure function of five tensors (conditions z, x_T, noise, temperature, cfg): `HeadGraphs` pads
them into a bucket's static buffers (pad rows: zeros, cfg and temperature 1) and runs the
eager sampler over them, captured as one CUDA graph ("graphs"), or the compiled whole loop
("compile"). Graphs of the model's own plans are built at start-up; others (`turbo`'s
annealed schedules, one per step count) are captured on first use, up to `max_units`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.decode import head as head_sampling
from engine.decode.compiled_head import compiled_loop
from engine.decode.graphs import GRAPH_MODES, Units, bucket_for, compare, log
from engine.decode.head import HeadPlan
from engine.model.diffloss import DiffLoss

HEAD_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # head rows (tokens) per call


@dataclass(eq=False)
class _Buffers:
    """A bucket's static inputs, shared by every plan of that (guided, bucket)."""

    z: Tensor  # (b, D), or (2b, D) = [cond; uncond]
    x_T: Tensor  # (b, C)
    noise: Tensor  # (T_native, b, C)
    temperature: Tensor  # (b, 1)
    cfg: Tensor | None  # (b, 1)

    def load(self, z: Tensor, x_T: Tensor, noise: Tensor, temperature: Tensor, cfg) -> None:
        n, b = len(x_T), len(self.x_T)
        if self.cfg is not None:  # [cond; uncond] halves land at [0, n) and [b, b + n)
            self.z.view(2, b, -1)[:, :n].copy_(z.view(2, n, -1))
            self.cfg[:n].copy_(cfg)
        else:
            self.z[:n].copy_(z)
        self.x_T[:n].copy_(x_T)
        steps = min(len(noise), len(self.noise))  # the stream may hold more draws than used
        self.noise[:steps, :n].copy_(noise[:steps])
        self.temperature[:n].copy_(temperature)

    def args(self, plan: HeadPlan) -> tuple:
        noise = self.noise[: plan.schedule.num_timesteps]
        return self.z, self.x_T, noise, self.temperature, self.cfg


class HeadGraphs(Units):
    """A head sampler (`head.sample`'s signature) that runs each call as one unit."""

    def __init__(
        self,
        head: DiffLoss,
        mode: str,
        buckets: str | Sequence[int] = HEAD_BUCKETS,
        max_units: int = 512,
    ) -> None:
        super().__init__(mode, head.net.input_proj.weight.device, buckets)
        self.head, self.buckets, self.max_units = head, self.stats.buckets, max_units
        self._buffers: dict[tuple[bool, int], _Buffers] = {}
        self._units: dict[tuple, tuple[_Buffers, Callable[[], Tensor]]] = {}

    def __call__(
        self,
        head: DiffLoss,
        plan: HeadPlan,
        z: Tensor,
        x_T: Tensor,
        step_noise: Tensor,
        temperature: Tensor,
        cfg: Tensor | None,
    ) -> Tensor:
        n, guided = len(x_T), cfg is not None
        bucket = bucket_for(n, self.buckets)
        unit = None
        if head is self.head and bucket is not None:
            unit = self._units.get((plan.key, guided, bucket))
            if unit is None and self.mode != "compile" and len(self._units) < self.max_units:
                unit = self._build(plan, guided, bucket)  # on first use: cheap outside inductor
        if unit is None:
            self.stats.misses += 1
            return head_sampling.sample(head, plan, z, x_T, step_noise, temperature, cfg)
        buffers, run = unit
        buffers.load(z, x_T, step_noise, temperature, cfg)
        self.stats.hits += 1
        self.stats.padded_rows += bucket - n
        return run()[:n].clone()  # the next run overwrites its output

    def warm(self, plans: Sequence[HeadPlan], guided: Sequence[bool] = (True, False)) -> None:
        """Build every (plan, guided, bucket) now, largest bucket first (smaller graphs reuse
        the pool), and log how long it took and the memory held, as vLLM does."""
        started = time.perf_counter()
        for bucket in reversed(self.buckets):
            for plan in plans:
                if self.mode == "compile" and plan.full is not None:
                    continue  # the head cache's plans stay eager under compile
                for g in guided:
                    if (plan.key, g, bucket) not in self._units:
                        self._build(plan, g, bucket)
        self.log_built("head", len(self._units), time.perf_counter() - started)

    def _buffers_for(self, guided: bool, bucket: int) -> _Buffers:
        if (guided, bucket) not in self._buffers:
            net, dev = self.head.net, self.device
            width, channels = net.cond_embed.in_features, net.in_channels
            steps = self.head.gen_schedule.num_timesteps
            buffers = _Buffers(
                z=torch.zeros((2 if guided else 1) * bucket, width, device=dev),
                x_T=torch.zeros(bucket, channels, device=dev),
                noise=torch.zeros(steps, bucket, channels, device=dev),
                temperature=torch.ones(bucket, 1, device=dev),
                cfg=torch.ones(bucket, 1, device=dev) if guided else None,
            )
            self.count_buffers(buffers.z, buffers.x_T, buffers.noise, buffers.temperature,
                               buffers.cfg)  # fmt: skip
            self._buffers[(guided, bucket)] = buffers
        return self._buffers[(guided, bucket)]

    def _build(self, plan: HeadPlan, guided: bool, bucket: int) -> tuple:
        buffers = self._buffers_for(guided, bucket)
        args = buffers.args(plan)
        with self.building():
            if self.mode == "compile":
                loop = compiled_loop(self.head.net, plan, guided)
                loop(*args)  # compiles now, not while serving
                run = lambda: loop(*args)  # noqa: E731
            else:
                run = self.runner(lambda: head_sampling.sample(self.head, plan, *args))
        self._units[(plan.key, guided, bucket)] = (buffers, run)
        return buffers, run


def head_plans(head: DiffLoss, configs: Sequence) -> list[HeadPlan]:
    """The plans worth building at start-up: each config's plan at step 0 when its head
    schedule is constant (the same plan every step; annealed ones change per step)."""
    plans: dict[tuple, HeadPlan] = {}
    for config in configs:
        if config.head.schedule != "constant":
            continue
        plan = head_sampling.HeadPolicy(config.head).plan(head, 0, 2)
        plans.setdefault(plan.key, plan)
    return list(plans.values())


def build_head(
    head: DiffLoss,
    mode: str,
    buckets: str | Sequence[int],
    configs: Sequence,
    guided: Sequence[bool] = (True, False),
) -> HeadGraphs | None:
    """The head's units for `mode` (`graphs.GRAPH_MODES`), built for `configs`' plans; None
    means eager. "auto" captures CUDA graphs and keeps them only if a guided call at the
    smallest bucket measures faster than eager on this device; off the GPU it is eager
    (inductor takes ~10-25 s per plan and bucket on CPU: a start-up cost, not a default)."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"graphs must be one of {', '.join(GRAPH_MODES)}: {mode!r}")
    device = head.net.input_proj.weight.device
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        log.info("head: eager (graphs %s on %s)", mode, device.type)
        return None
    plans = head_plans(head, configs)
    units = HeadGraphs(head, "graphs" if mode == "auto" else mode, buckets)
    if mode == "auto":
        eager_s, unit_s = measure(units, plans[0], units.buckets[0])
        verdict = f"graphs {unit_s * 1e3:.2f} ms vs eager {eager_s * 1e3:.2f} ms per call"
        log.info("head graphs auto: %s", verdict)
        if unit_s >= eager_s:
            return None
        units.stats.note = f"auto: {verdict}"
    units.warm(plans, guided)
    return units


def measure(units: HeadGraphs, plan: HeadPlan, rows: int) -> tuple[float, float]:
    """Median seconds of one guided head call of `rows` rows: eager, then as a unit."""
    net, dev = units.head.net, units.device
    steps = units.head.gen_schedule.num_timesteps
    z = torch.randn(2 * rows, net.cond_embed.in_features, device=dev)
    x_T = torch.randn(rows, net.in_channels, device=dev)
    noise = torch.randn(steps, rows, net.in_channels, device=dev)
    temperature, cfg = torch.ones(rows, 1, device=dev), torch.full((rows, 1), 3.0, device=dev)
    args = (units.head, plan, z, x_T, noise, temperature, cfg)
    hits = units.stats.hits
    result = compare(dev, lambda: head_sampling.sample(*args), lambda: units(*args))
    units.stats.hits = hits  # measuring is not serving
    return result
