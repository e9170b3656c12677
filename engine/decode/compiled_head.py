"""The diffusion head's whole DDPM loop for one plan as one `torch.compile`d function (the
"compile" mode of `graphs.HeadGraphs`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.decode.head import HeadPlan
from engine.model import diffloss
from engine.model.diffloss import SimpleMLPAdaLN, scale_plus_one


def compiled_loop(net: SimpleMLPAdaLN, plan: HeadPlan, guided: bool) -> Callable[..., Tensor]:
    """`diffloss.sample` for `plan` (no head cache) as one compiled function of
    (z, x_T, noise, temperature, cfg): the prologue (condition and time embeddings, every
    step's adaLN outputs in blocks, the scaled noise) and T stamped copies of the step body
    (`nested_compile_region`: traced once). The same maths as eager; inductor fuses the
    elementwise ops, so results agree to rounding (tested at 1e-5 relative in fp32)."""
    if plan.full is not None:
        raise ValueError("the compiled loop covers plans without the head cache")
    schedule = plan.schedule
    num_t, width, depth = schedule.num_timesteps, net.input_proj.out_features, len(net.res_blocks)
    terms = schedule.step_terms(net.input_proj.weight.device)
    device = terms.timestep_map.device
    # everything in loop order (draw k runs diffusion index T-1-k)
    tmap = terms.timestep_map.flip(0)  # (T,)
    coef = torch.tensor(  # (T, 4): A, B, P, Q of each step
        [[terms.a[i], terms.b[i], float(terms.p[i]), float(terms.q[i])]
         for i in reversed(range(num_t))], device=device,
    )  # fmt: skip
    noisy = torch.ones(num_t, 1, 1, device=device)
    noisy[-1] = 0.0  # the last step (index 0) adds no noise
    layers = [*net.res_blocks, net.final_layer]
    mod_weights = [layer.adaLN_modulation[-1].weight for layer in layers]
    mod_biases = [scale_plus_one(layer.adaLN_modulation[-1].bias, width) for layer in layers]
    weights = net.lean_weights()
    channels = net.in_channels

    @torch.compiler.nested_compile_region
    def body(x: Tensor, mods: Tensor, co: Tensor, noise: Tensor, cfg: Tensor) -> Tensor:
        pieces = list(mods.view(mods.shape[0], 3 * depth + 2, width).unbind(1))  # (R, W) each
        out = net.forward_lean(x, pieces, weights, guided).float()  # (R, 2C)
        eps, v = out.split(channels, dim=1)
        if guided:
            cond_eps, uncond_eps = eps.chunk(2)
            eps, v = torch.lerp(uncond_eps, cond_eps, cfg), v[: len(x)]
        return x * co[0] + eps * co[1] + torch.exp(co[2] + v * co[3]) * noise

    def loop(z: Tensor, x_T: Tensor, noise: Tensor, temperature: Tensor, cfg) -> Tensor:
        cfg = cfg if guided else temperature  # unguided: an unused stand-in
        c_emb = net.cond_embed(z)  # (R, W)
        t_emb = net.time_embed(tmap)  # (T, W)
        scaled = noise[:num_t] * temperature * noisy  # (T, N, C)
        block = max(1, min(num_t, diffloss.MODULATION_BUDGET // (len(z) * net.modulation_width)))
        x = x_T
        for lo in range(0, num_t, block):
            act = F.silu(c_emb[None] + t_emb[lo : lo + block, None])  # (blk, R, W)
            mods = torch.cat(
                [F.linear(act, w, b) for w, b in zip(mod_weights, mod_biases, strict=True)], -1
            )  # (blk, R, modulation_width)
            for j in range(mods.shape[0]):
                x = body(x, mods[j], coef[lo + j], scaled[lo + j], cfg)
        return x

    return torch.compile(loop, dynamic=False, fullgraph=True, isolate_recompiles=True)
