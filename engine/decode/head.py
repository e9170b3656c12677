"""The diffusion head's decoding policy: how many DDPM steps each AR step gets, and which of
those steps run the whole MLP.

Two knobs, both exact when off (`HeadConfig()` is upstream's sampler, bit for bit):

* **step schedule** (DiSA, arXiv 2505.20297): the number of DDPM steps T as a function of AR
  progress, annealed from `upper` at the first AR step to `lower` at the last, `linear`
  (DiSA's rule: T = lower + int((N-1-s)/(N-1) * (upper-lower))) or `cosine`. Annealed counts are
  respaced evenly over base timesteps [0, clip]: DiSA clips at 950 because the last base steps of
  the cosine schedule have alpha_bar ~ 1e-9, where the first DDPM step multiplies the head's eps
  error by 1/sqrt(alpha_bar) (our digits head needed the same: see docs/ENGINE.md);
* **head cache** (LazyMAR's `CachedDiffLoss`, arXiv 2503.12450): the MLP runs in full only on
  every `cache_period`-th diffusion step and on the noisiest `cache_full_fraction` of them. A
  full step stores each res block's MLP output (conditional rows) and the CFG difference
  eps_c - eps_u. The other steps run the conditional rows only: the input projection and the
  adaLN gates are recomputed for the new (x_t, t), the blocks' MLP outputs are reused, the
  final layer runs, and eps_u = eps_c - (eps_c - eps_u)_cached.

The noise stream is the model's own (T_native draws per token), whatever T a step uses: step
j of any schedule takes draw j, so an accelerated image differs from exact MAR's only by the
approximation, never by different random numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from engine.model import diffloss
from engine.model.diffloss import DiffLoss, SimpleMLPAdaLN
from engine.model.diffusion import NUM_TRAIN_TIMESTEPS, DiffusionSchedule

HEAD_SCHEDULES = ("constant", "linear", "cosine")
HeadSampler = Callable[..., Tensor]  # the signature of `sample`: what the step engine calls


@dataclass(frozen=True)
class HeadConfig:
    """Diffusion-head knobs. The defaults are exact MAR: the model's own steps, no cache."""

    schedule: str = "constant"  # DDPM steps per AR step: constant | linear | cosine
    upper: int | None = None  # steps at the first AR step (None: the model's own count)
    lower: int = 5  # steps at the last AR step (annealed schedules)
    clip: int = 950  # annealed schedules: the noisiest base timestep kept
    cache_period: int = 0  # head cache: a full MLP every cache_period-th step (0: off)
    cache_full_fraction: float = 0.1  # head cache: the noisiest share of steps always full

    def __post_init__(self) -> None:
        if self.schedule not in HEAD_SCHEDULES:
            raise ValueError(f"head schedule must be one of {HEAD_SCHEDULES}")
        if self.lower < 1 or (self.upper is not None and self.upper < self.lower):
            raise ValueError("head steps need 1 <= lower <= upper")
        if not 0 < self.clip < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"clip must be in 1..{NUM_TRAIN_TIMESTEPS - 1}")
        if self.cache_period < 0 or not 0.0 <= self.cache_full_fraction <= 1.0:
            raise ValueError("cache_period >= 0 and 0 <= cache_full_fraction <= 1 are needed")

    @property
    def exact(self) -> bool:
        return self.schedule == "constant" and self.upper is None and self.cache_period == 0

    def num_steps(self, step: int, num_iter: int, native: int) -> int:
        """DDPM steps of the head at AR step `step` of `num_iter`."""
        upper = native if self.upper is None else min(self.upper, native)
        if self.schedule == "constant":
            return upper
        lower = min(self.lower, upper)
        progress = step / (num_iter - 1) if num_iter > 1 else 0.0  # 0 first AR step, 1 last
        if self.schedule == "linear":
            weight = 1.0 - progress
        else:
            weight = 0.5 * (1.0 + math.cos(math.pi * progress))
        return lower + int(weight * (upper - lower))


@lru_cache(maxsize=256)
def clipped_schedule(num_steps: int, clip: int) -> DiffusionSchedule:
    """The cosine diffusion respaced to `num_steps` base timesteps evenly over [0, clip]."""
    kept = np.unique(np.round(np.linspace(0, clip, num_steps)).astype(np.int64))
    return DiffusionSchedule.from_kept(kept.tolist())


@dataclass(frozen=True, eq=False)
class HeadPlan:
    """What the head does for one AR step: its DDPM schedule and, under the head cache, the
    diffusion indices that run the whole MLP. Rows with equal `key`s share a head call."""

    schedule: DiffusionSchedule
    full: frozenset[int] | None = None  # None: every step in full (no head cache)

    @property
    def key(self) -> tuple:
        return (id(self.schedule), self.full)


class HeadPolicy:
    """Plans the head's work for an AR step under a `HeadConfig`."""

    def __init__(self, config: HeadConfig | None = None) -> None:
        self.config = config or HeadConfig()

    def schedule(self, head: DiffLoss, step: int, num_iter: int) -> DiffusionSchedule:
        native = head.gen_schedule
        cfg = self.config
        if cfg.schedule == "constant" and (cfg.upper is None or cfg.upper >= native.num_timesteps):
            return native
        return clipped_schedule(cfg.num_steps(step, num_iter, native.num_timesteps), cfg.clip)

    def plan(self, head: DiffLoss, step: int, num_iter: int) -> HeadPlan:
        schedule = self.schedule(head, step, num_iter)
        if self.config.cache_period == 0:
            return HeadPlan(schedule)
        num_t = schedule.num_timesteps
        full = full_steps(num_t, self.config.cache_period, self.config.cache_full_fraction)
        return HeadPlan(schedule, full)


def sample(
    head: DiffLoss,
    plan: HeadPlan,
    z: Tensor,
    x_T: Tensor,
    step_noise: Tensor,
    temperature: Tensor,
    cfg: Tensor | None,
) -> Tensor:
    """x_0 (N, C) for conditions z (N or 2N rows, see `diffloss.sample`) under `plan`.

    step_noise holds the model's whole stream (T_native, N, C): call j takes draw j."""
    noise = step_noise[: plan.schedule.num_timesteps]
    if plan.full is None:
        return diffloss.sample(head.net, plan.schedule, z, x_T, noise, temperature, cfg)
    return sample_cached(head.net, plan.schedule, z, x_T, noise, temperature, cfg, plan.full)


@lru_cache(maxsize=1024)
def full_steps(num_t: int, period: int, full_fraction: float) -> frozenset[int]:
    """Diffusion indices i (T-1 = noisiest) that run the whole MLP under the head cache."""
    num_noisy = math.ceil(full_fraction * num_t)
    return frozenset(
        i for i in range(num_t) if i >= num_t - max(1, num_noisy) or (num_t - 1 - i) % period == 0
    )


_INDEX: dict[tuple, Tensor] = {}  # (steps, device) -> the step list as a device tensor


def _device_index(steps: tuple[int, ...], device: torch.device) -> Tensor:
    """`steps` as an index tensor on `device`, built once (no host copy in later steps)."""
    key = (steps, str(device))
    if key not in _INDEX:
        _INDEX[key] = torch.tensor(steps, dtype=torch.long, device=device)
    return _INDEX[key]


def _pieces_stream(
    net: SimpleMLPAdaLN,
    y_base: Tensor,
    t_emb: Tensor,
    steps: tuple[int, ...],
    per_step: int,
    gates_only: bool,
) -> Iterator[list[Tensor]]:
    """Each diffusion index in `steps`, in order: its adaLN outputs as `forward_lean`'s
    pieces (`SimpleMLPAdaLN.modulation_pieces`), computed in blocks of steps (one matmul per
    layer and block, as `diffloss.sample` does)."""
    if not steps:
        return
    block = max(1, diffloss.MODULATION_BUDGET // max(1, per_step))
    index = _device_index(steps, t_emb.device)
    for lo in range(0, len(steps), block):
        chunk = index[lo : lo + block]
        yield from net.modulation_pieces(y_base[None] + t_emb[chunk][:, None], gates_only)


@torch.no_grad()
def sample_cached(
    net: SimpleMLPAdaLN,
    schedule: DiffusionSchedule,
    z: Tensor,
    x_T: Tensor,
    step_noise: Tensor,
    temperature: Tensor,
    cfg: Tensor | None,
    full: frozenset[int],
) -> Tensor:
    """`diffloss.sample` with LazyMAR's head cache (module docstring); same arguments, plus the
    diffusion indices that run in full (the noisiest one must be among them). Lean as the
    exact sampler: a lazy step is the input projection, one fused op per res block (its
    cached MLP output, gated), the final layer and the fused update."""
    num_t, channels, n = schedule.num_timesteps, x_T.shape[1], len(x_T)
    assert num_t - 1 in full, "the first diffusion step must fill the cache"
    terms = schedule.step_terms(x_T.device)
    c_emb = net.cond_embed(z)  # (N or 2N, W)
    t_emb = net.time_embed(terms.timestep_map)  # (T, W)
    weights = net.lean_weights()
    noise = (step_noise[:num_t] * temperature).unbind(0)
    order = list(reversed(range(num_t)))
    full_order = tuple(i for i in order if i in full)
    lazy_order = tuple(i for i in order if i not in full)
    full_mods = _pieces_stream(
        net, c_emb, t_emb, full_order, len(z) * net.modulation_width, gates_only=False
    )
    lazy_mods = _pieces_stream(net, c_emb[:n], t_emb, lazy_order, n * net.gate_width, True)
    mlp_out: list[Tensor] = []  # per res block: its MLP output on the last full step (N, W)
    cfg_delta: Tensor | None = None  # (cfg - 1) (eps_c - eps_u) on the last full step (N, C)
    x = x_T
    for i in order:
        if i in full:
            mlp_out = []
            out = net.forward_lean(x, next(full_mods), weights, cfg is not None, mlp_out).float()
            eps, v = out.split(channels, dim=1)
            if cfg is not None:
                cond_eps, uncond_eps = eps.chunk(2)
                cfg_delta = (cond_eps - uncond_eps).mul_(cfg - 1)
                eps, v = torch.lerp(uncond_eps, cond_eps, cfg), v[:n]
        else:
            pieces = next(lazy_mods)  # a gate per res block, then the final (shift, 1 + scale)
            h = torch.addmm(weights[1], x, weights[0])
            for gate, out in zip(pieces[:-2], mlp_out, strict=True):
                h = torch.addcmul(h, gate, out)
            out = net.final_lean(h, pieces[-2], pieces[-1], weights).float()
            eps, v = out.split(channels, dim=1)
            if cfg_delta is not None:  # eps_u = eps_c - delta: eps_u + cfg (eps_c - eps_u)
                eps = eps + cfg_delta
        x = terms.update(i, x, eps, v, noise[num_t - 1 - i])
    return x
