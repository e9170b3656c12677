"""The diffusion head's pass, eager: the one DDPM loop (upstream `DiffLoss.sample`).

One loop serves every way the head runs: exact MAR's sampler, LazyMAR's head cache (steps
that reuse the MLP outputs of the last whole-MLP step, `HeadPlan.mlp_steps`), and the traced
loop that `units/head.py` compiles (each diffusion step a `nested_compile_region`, its
constants passed as a tensor row so that one region serves every step).

Everything that does not depend on x_t is done before the loop, in a few large ops: every
step's adaLN outputs (blocks of steps, one matmul per layer and block), the schedule's
per-step constants (`DiffusionSchedule.step_terms`), and the temperature-scaled noise. A
diffusion step is then the MLP (`forward_lean`) and a fused update: about 14 + 6 x depth ops.
The noise stream is the model's own (T_native draws per token), whatever T a plan uses: step
j of any schedule takes draw j. Only the conditional trajectory is carried (upstream's
unconditional half is discarded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.decode.head import HeadPlan
from engine.model import diffloss
from engine.model.diffloss import DiffLoss, SimpleMLPAdaLN
from engine.model.diffusion import DiffusionSchedule

TracedStep = Callable[..., Tensor]  # (x, packed modulations, coefficients, noise, cfg) -> x_{i-1}


def sample(
    head: DiffLoss,
    plan: HeadPlan,
    z: Tensor,
    x_T: Tensor,
    step_noise: Tensor,
    temperature: Tensor,
    cfg: Tensor | None,
) -> Tensor:
    """x_0 (N, C) for conditions z (N rows, or 2N = [cond; uncond] when `cfg` is given) under
    `plan`; step_noise holds the model's whole stream (T_native, N, C): call j takes draw j."""
    net, schedule = head.net, plan.schedule
    return ddpm_loop(net, schedule, z, x_T, step_noise, temperature, cfg, plan.mlp_steps)


@dataclass
class HeadCache:
    """LazyMAR's head cache, filled on whole-MLP steps: each res block's MLP output for the
    conditional rows, and (cfg - 1) (eps_c - eps_u)."""

    mlp_out: list[Tensor] = field(default_factory=list)  # per res block: (N, W)
    cfg_delta: Tensor | None = None  # (N, C)


@torch.no_grad()
def ddpm_loop(
    net: SimpleMLPAdaLN,
    schedule: DiffusionSchedule,
    z: Tensor,
    x_T: Tensor,
    step_noise: Tensor,
    temperature: Tensor,
    cfg: Tensor | None = None,
    mlp_steps: frozenset[int] | None = None,
    traced_step: TracedStep | None = None,
) -> Tensor:
    """The DDPM loop, noise injected. x_T: (N, C) initial noise (not scaled by temperature);
    step_noise: (T, N, C), entry k belongs to diffusion index T-1-k; temperature, cfg: (N, 1).
    `mlp_steps`: the diffusion indices that run the whole MLP (None: all; the others use the
    head cache, and the noisiest index must be among them). `traced_step`: a step to trace
    (`traced_step(net, guided)`; no head cache). Returns x_0 (N, C), float32."""
    num_t, n = schedule.num_timesteps, len(x_T)
    terms = schedule.step_terms(x_T.device)
    c_emb = net.cond_embed(z)  # (N or 2N, W): constant over the diffusion steps
    t_emb = net.time_embed(terms.timestep_map)  # (T, W): one row per diffusion index
    weights = net.lean_weights()
    order = tuple(reversed(range(num_t)))  # diffusion index i takes draw T-1-i
    whole = order if mlp_steps is None else tuple(i for i in order if i in mlp_steps)
    cached = () if mlp_steps is None else tuple(i for i in order if i not in mlp_steps)
    if cached and (order[0] not in whole or traced_step is not None):
        raise ValueError("the head cache needs the noisiest step whole, and is not traced")
    packed = traced_step is not None  # a traced step takes one tensor, not aliasing views
    per_step = len(z) * net.modulation_width
    whole_mods = modulation_stream(net, c_emb, t_emb, whole, per_step, packed=packed)
    cached_mods = modulation_stream(net, c_emb[:n], t_emb, cached, n * net.gate_width, True)
    cache = HeadCache() if cached else None
    if traced_step is not None:
        return _traced(terms, x_T, step_noise[:num_t] * temperature, cfg, whole_mods, traced_step)
    noise = (step_noise[:num_t] * temperature).unbind(0)
    x = x_T
    for i in order:
        if cache is None or i in mlp_steps:
            eps, v = whole_mlp(net, x, next(whole_mods), weights, cfg, cache)
        else:
            eps, v = cached_mlp(net, x, next(cached_mods), weights, cache)
        x = terms.update(i, x, eps, v, noise[num_t - 1 - i])
    return x


def whole_mlp(
    net: SimpleMLPAdaLN,
    x: Tensor,
    pieces: list[Tensor],
    weights: tuple[Tensor, ...],
    cfg: Tensor | None,
    cache: HeadCache | None = None,
) -> tuple[Tensor, Tensor]:
    """eps and v (N, C) for x_t (N, C) through the whole MLP, guided when `cfg` is given
    (eps = eps_u + cfg (eps_c - eps_u)); fills `cache` when given."""
    keep: list[Tensor] | None = None if cache is None else []
    out = net.forward_lean(x, pieces, weights, cfg is not None, keep)
    eps, v = out.float().split(net.in_channels, dim=1)  # (R, C) each
    if cfg is not None:
        cond_eps, uncond_eps = eps.chunk(2)
        if cache is not None:
            cache.cfg_delta = (cond_eps - uncond_eps).mul_(cfg - 1)
        eps, v = torch.lerp(uncond_eps, cond_eps, cfg), v[: len(x)]
    if cache is not None and keep is not None:
        cache.mlp_out = keep
    return eps, v


def cached_mlp(
    net: SimpleMLPAdaLN,
    x: Tensor,
    pieces: list[Tensor],
    weights: tuple[Tensor, ...],
    cache: HeadCache,
) -> tuple[Tensor, Tensor]:
    """eps and v (N, C) from the head cache: the input projection and each res block's
    cached MLP output, gated anew for this (x_t, t); the final layer; eps_u = eps_c - delta.
    `pieces`: a gate per res block, then the final layer's (shift, 1 + scale)."""
    h = torch.addmm(weights[1], x, weights[0])
    for gate, out in zip(pieces[:-2], cache.mlp_out, strict=True):
        h = torch.addcmul(h, gate, out)
    out = net.final_lean(h, pieces[-2], pieces[-1], weights).float()
    eps, v = out.split(net.in_channels, dim=1)
    if cache.cfg_delta is not None:  # eps_u + cfg (eps_c - eps_u) = eps_c + (cfg - 1) delta
        eps = eps + cache.cfg_delta
    return eps, v


def traced_step(net: SimpleMLPAdaLN, guided: bool) -> TracedStep:
    """One diffusion step as a `nested_compile_region` (traced once, stamped T times): the
    whole MLP and the update with the step's constants as a tensor row (A, B, P, Q) instead
    of Python floats. Unguided, `cfg` is an unused stand-in."""
    weights = net.lean_weights()

    @torch.compiler.nested_compile_region
    def step(x: Tensor, mods: Tensor, co: Tensor, noise: Tensor, cfg: Tensor) -> Tensor:
        pieces = net.unpack_modulations(mods)  # views made inside: a region's inputs may not alias
        eps, v = whole_mlp(net, x, pieces, weights, cfg if guided else None)
        return x * co[0] + eps * co[1] + torch.exp(co[2] + v * co[3]) * noise

    return step


def _traced(terms, x_T, noise, cfg, mods: Iterator[Tensor], step: TracedStep) -> Tensor:
    """The loop with `step` for every diffusion index; the last one adds no noise."""
    num_t, x = len(terms.table), x_T
    cfg = cfg if cfg is not None else torch.ones_like(x_T[:, :1])
    for i in reversed(range(num_t)):
        draw = noise[num_t - 1 - i] if i > 0 else torch.zeros_like(x)
        x = step(x, next(mods), terms.table[i], draw, cfg)
    return x


_INDEX: dict[tuple, Tensor] = {}  # (steps, device) -> the step list as a device tensor


def _device_index(steps: tuple[int, ...], device: torch.device) -> Tensor:
    """`steps` as an index tensor on `device`, built once (no host copy in later steps)."""
    key = (steps, str(device))
    if key not in _INDEX:
        _INDEX[key] = torch.tensor(steps, dtype=torch.long, device=device)
    return _INDEX[key]


def modulation_stream(
    net: SimpleMLPAdaLN,
    y_base: Tensor,
    t_emb: Tensor,
    steps: tuple[int, ...],
    per_step: int,
    gates_only: bool = False,
    packed: bool = False,
) -> Iterator:
    """Each diffusion index in `steps` (loop order), its adaLN outputs as `forward_lean`'s
    pieces (`SimpleMLPAdaLN.modulation_pieces`; `packed`: one tensor per step,
    `packed_modulations`). y = c_emb + t_emb[i] enters the MLP only
    through the adaLN linears and every y is known up front, so they are computed for a
    block of steps in one matmul per layer (T_blk x N rows) instead of T matrix-vector
    products that each re-read those weights (over half the head's parameters); blocks keep
    the buffer under `diffloss.MODULATION_BUDGET` elements."""
    if not steps:
        return
    block = max(1, diffloss.MODULATION_BUDGET // max(1, per_step))
    for lo in range(0, len(steps), block):
        chunk = steps[lo : lo + block][::-1]  # ascending
        if chunk[-1] - chunk[0] + 1 == len(chunk):  # a run of indices: a view
            t = t_emb[chunk[0] : chunk[-1] + 1]
        else:
            t = t_emb[_device_index(chunk, t_emb.device)]
        y = y_base[None] + t[:, None]  # (blk, R, W)
        if packed:
            yield from net.packed_modulations(y).unbind(0)[::-1]
        else:
            yield from reversed(net.modulation_pieces(y, gates_only))
