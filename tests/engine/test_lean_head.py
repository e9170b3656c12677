"""The diffusion head in few eager ops: the lean MLP step and the folded DDPM update equal the
plain formulas (1e-5), and a diffusion step stays within its op budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.decode.passes.head import ddpm_loop
from engine.eval.dispatch import OpCounter
from engine.model.diffloss import SimpleMLPAdaLN
from engine.model.diffusion import DiffusionSchedule

C, W, Z = 4, 32, 24


def perturbed_net(depth: int) -> SimpleMLPAdaLN:
    """Upstream init zeroes the adaLN and output layers: perturb so every path matters."""
    torch.manual_seed(depth)
    net = SimpleMLPAdaLN(C, W, Z, depth).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("depth", [1, 3])
def test_the_lean_step_is_forward_modulated(depth, guided):
    net, n = perturbed_net(depth), 5
    x = torch.randn(n, C)
    y = torch.randn(3, 2 * n if guided else n, W)  # 3 diffusion steps' y
    with torch.no_grad():
        mods = net.modulations(y)
        pieces = net.modulation_pieces(y)
        for k in range(3):
            want = net.forward_modulated(torch.cat([x, x]) if guided else x, [m[k] for m in mods])
            got = net.forward_lean(x, pieces[k], net.lean_weights(), guided)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the head cache's lazy steps: each block's gate, the final layer's shift and 1 + scale
        gates = net.modulation_pieces(y, gates_only=True)
        for k in range(3):
            blocks = [m[k].chunk(3, dim=-1)[2] for m in mods[:-1]]
            shift, scale = mods[-1][k].chunk(2, dim=-1)
            for got, want in zip(gates[k], [*blocks, shift, 1 + scale], strict=True):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_the_folded_update_is_upstreams_ddpm_step():
    schedule, n = DiffusionSchedule.create("100"), 6
    terms = schedule.step_terms("cpu")

    def f32(a: np.ndarray, i: int) -> float:  # upstream gathers float32 coefficients
        return float(np.float32(a[i]))

    torch.manual_seed(0)
    for i in (99, 50, 1, 0):
        x, eps, v, noise = (torch.randn(n, C) for _ in range(4))
        v = v.clamp(-1, 1)
        frac = (v + 1) / 2
        log_var = frac * f32(schedule.log_betas, i) + (1 - frac) * f32(
            schedule.posterior_log_variance_clipped, i
        )
        x0 = (
            f32(schedule.sqrt_recip_alphas_cumprod, i) * x
            - f32(schedule.sqrt_recipm1_alphas_cumprod, i) * eps
        )
        mean = (
            f32(schedule.posterior_mean_coef1, i) * x0 + f32(schedule.posterior_mean_coef2, i) * x
        )
        want = mean + torch.exp(0.5 * log_var) * noise if i > 0 else mean
        torch.testing.assert_close(terms.update(i, x, eps, v, noise), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [2, 6])
def test_a_diffusion_step_stays_within_its_op_budget(depth):
    """14 + 6 x depth calls per guided diffusion step (6 per res block: LayerNorm, two fused
    modulations, addmm, silu_, addmm) and 3 views, plus a per-call setup."""
    net, n = perturbed_net(depth), 1
    schedule = DiffusionSchedule.create("ddim50")
    z, x_T = torch.randn(2 * n, Z), torch.randn(n, C)
    noise, temp, cfg = torch.randn(50, n, C), torch.ones(n, 1), torch.full((n, 1), 3.0)
    ddpm_loop(net, schedule, z, x_T, noise, temp, cfg)  # builds the step terms
    counter = OpCounter()
    with counter:
        ddpm_loop(net, schedule, z, x_T, noise, temp, cfg)
    steps = schedule.num_timesteps
    setup = 15 * depth + 30  # once per call: embeddings, the adaLN outputs and their views
    assert counter.ops["other"] <= (14 + 6 * depth) * steps + setup, counter.ops["other"]
    assert counter.free["other"] <= 3 * steps + setup, counter.free["other"]  # split, chunk, slice
    assert counter.syncs["other"] == 0
