"""The diffusion head as one unit per (plan, guided, token bucket): the twin of
`passes/head.py` (modes: `units/common.py`).

A head call is T diffusion steps of about 14 + 6 x depth small ops each (digits: 1,189 ops per
AR step at batch 1, MAR-B 4,751). Once its plan (schedule, head-cache steps) is fixed, it is a
pure function of five tensors (conditions z, x_T, noise, temperature, cfg): `HeadUnits` pads
them into a bucket's static buffers (pad rows: zeros, cfg and temperature 1) and runs the
eager loop over them, captured as one CUDA graph ("cuda-graphs"), or the same loop traced
and compiled ("compile"). Units of the model's own plans are built at start-up; others
(`turbo`'s annealed schedules, one per step count) are captured on first use, up to
`max_units`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.decode.head import HeadPlan
from engine.decode.passes import head as head_pass
from engine.decode.units.common import Units, bucket_for
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


class HeadUnits(Units):
    """Runs head calls (`passes.head.sample`'s arguments) as units."""

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

    def can_run(self, head: DiffLoss, plan: HeadPlan, z: Tensor, x_T: Tensor, *rest) -> bool:
        """A unit exists for this call's (plan, guided, bucket), or may be built now (never
        compiled while serving; at most `max_units`)."""
        bucket = bucket_for(len(x_T), self.buckets)
        if head is not self.head or bucket is None:
            return False
        key = (plan.key, rest[-1] is not None, bucket)
        return key in self._units or (self.mode != "compile" and len(self._units) < self.max_units)

    def run(
        self,
        head: DiffLoss,
        plan: HeadPlan,
        z: Tensor,
        x_T: Tensor,
        step_noise: Tensor,
        temperature: Tensor,
        cfg: Tensor | None,
    ) -> Tensor:
        """`passes.head.sample` of this call as a unit: x_0 (N, C)."""
        n, guided = len(x_T), cfg is not None
        bucket = bucket_for(n, self.buckets)
        assert bucket is not None
        unit = self._units.get((plan.key, guided, bucket))
        if unit is None:
            unit = self._build(plan, guided, bucket)  # on first use: cheap outside inductor
        buffers, run = unit
        buffers.load(z, x_T, step_noise, temperature, cfg)
        self.stats.padded_rows += bucket - n
        return run()[:n].clone()  # the next run overwrites its output

    def warm(self, plans: Sequence[HeadPlan], guided: Sequence[bool] = (True, False)) -> None:
        """Build every (plan, guided, bucket) now, largest bucket first (smaller graphs reuse
        the pool), and log how long it took and the memory held, as vLLM does."""
        started = time.perf_counter()
        for bucket in reversed(self.buckets):
            for plan in plans:
                if self.mode == "compile" and plan.mlp_steps is not None:
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
                run = compiled_loop(self.head, plan, guided, args)
            else:
                run = self.runner(lambda: head_pass.sample(self.head, plan, *args))
        self._units[(plan.key, guided, bucket)] = (buffers, run)
        return buffers, run


def compiled_loop(head: DiffLoss, plan: HeadPlan, guided: bool, args: tuple) -> Callable:
    """The head's whole loop for `plan` (no head cache) through inductor, compiled now, not
    while serving: the prologue (embeddings, the adaLN outputs in blocks, the scaled noise)
    and T stamped copies of one traced step (`passes.head.traced_step`). The same maths as
    eager; inductor fuses the elementwise ops, so results agree to rounding."""
    if plan.mlp_steps is not None:
        raise ValueError("the compiled loop covers plans without the head cache")
    step = head_pass.traced_step(head.net, guided)
    plan.schedule.step_terms(args[1].device)  # its constants, built outside the trace

    def loop(z: Tensor, x_T: Tensor, noise: Tensor, temperature: Tensor, cfg) -> Tensor:
        return head_pass.ddpm_loop(
            head.net, plan.schedule, z, x_T, noise, temperature, cfg, traced_step=step
        )

    compiled = torch.compile(loop, dynamic=False, fullgraph=True, isolate_recompiles=True)
    compiled(*args)
    return lambda: compiled(*args)
