"""MAR's DiffLoss head: the small MLP denoiser (`SimpleMLPAdaLN`) and its DDPM sampler.

Key names match upstream (`diffloss.net.*`). The sampler is a plain function over injected
noise: x_T and the per-step noise come in as tensors, so the caller owns all randomness.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from engine.model.diffusion import DiffusionSchedule

MODULATION_BUDGET = 1 << 24  # elements of precomputed adaLN outputs per block of steps


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: Tensor, dim: int = 256, max_period: int = 10000) -> Tensor:
    """Sinusoidal features of the (original, 0..999) timestep, laid out [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: Tensor, mod: Tensor) -> Tensor:
        """The block given its adaLN output mod = adaLN_modulation(y) (N, 3W)."""
        shift, scale, gate = mod.chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: Tensor, mod: Tensor) -> Tensor:
        """The layer given its adaLN output mod = adaLN_modulation(y) (N, 2W)."""
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """eps (first half of the output) and variance interpolation v (second half) for x_t."""

    def __init__(
        self, in_channels: int, model_channels: int, z_channels: int, num_res_blocks: int
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, 2 * in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Upstream init: xavier linears, N(0, .02) time MLP, zeroed adaLN and output layer."""

        def basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0)

        self.apply(basic_init)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def modulation_width(self) -> int:
        """Features of all adaLN outputs together: 3W per res block, 2W for the final layer."""
        width = self.input_proj.out_features
        return (3 * len(self.res_blocks) + 2) * width

    def modulations(self, y: Tensor) -> list[Tensor]:
        """Every layer's adaLN output for y (..., W): the only place y enters the MLP."""
        layers = [*self.res_blocks, self.final_layer]
        return [layer.adaLN_modulation(y) for layer in layers]

    @property
    def gate_width(self) -> int:
        """Features of `gate_modulations`: W per res block, 2W for the final layer."""
        width = self.input_proj.out_features
        return (len(self.res_blocks) + 2) * width

    def gate_modulations(self, y: Tensor) -> list[Tensor]:
        """Each res block's adaLN gate (..., W) and the final layer's adaLN output (..., 2W):
        what a step needs that reuses the blocks' MLP outputs (the head cache)."""
        width = self.input_proj.out_features
        act = torch.nn.functional.silu(y)
        gates = []
        for block in self.res_blocks:
            linear = block.adaLN_modulation[-1]
            weight, bias = linear.weight[2 * width :], linear.bias[2 * width :]
            gates.append(torch.nn.functional.linear(act, weight, bias))
        return [*gates, self.final_layer.adaLN_modulation(y)]

    def forward_modulated(self, x: Tensor, mods: list[Tensor]) -> Tensor:
        """The MLP given `modulations(y)` (one (N, kW) tensor per layer)."""
        x = self.input_proj(x)
        for block, mod in zip(self.res_blocks, mods[:-1], strict=True):
            x = block(x, mod)
        return self.final_layer(x, mods[-1])

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        y = self.time_embed(t) + self.cond_embed(c)
        return self.forward_modulated(x, self.modulations(y))

    def forward_with_cfg(self, x: Tensor, t: Tensor, c: Tensor, cfg_scale: float) -> Tensor:
        """Upstream's CFG call: both branches see the first half of x; eps channels guided."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond_eps, uncond_eps = eps.chunk(2)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


class DiffLoss(nn.Module):
    """Container matching upstream's `diffloss.net.*` keys, plus the sampling schedule."""

    def __init__(
        self,
        target_channels: int,
        z_channels: int,
        depth: int,
        width: int,
        num_sampling_steps: str = "100",
    ) -> None:
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, z_channels, depth)
        self.gen_schedule = DiffusionSchedule.create(num_sampling_steps)


@torch.no_grad()
def sample(
    net: SimpleMLPAdaLN,
    schedule: DiffusionSchedule,
    z: Tensor,
    x_T: Tensor,
    step_noise: Tensor,
    temperature: Tensor,
    cfg: Tensor | None = None,
) -> Tensor:
    """Upstream `DiffLoss.sample` (100-step DDPM, learned-range variance), noise injected.

    z: (N, D) conditions, or (2N, D) = [cond; uncond] when `cfg` is given.
    x_T: (N, C) initial noise (not scaled by temperature). step_noise: (T, N, C), entry k
    belongs to diffusion index T-1-k. temperature, cfg: (N, 1) per-row scales.
    Only the conditional trajectory is carried: upstream's unconditional half is discarded.
    Returns x_0 (N, C), float32.
    """
    coef = schedule.coefficients(x_T.device)
    tmap = coef["timestep_map"]
    num_t, channels = schedule.num_timesteps, x_T.shape[1]
    c_emb = net.cond_embed(z)  # constant over the diffusion steps
    t_emb = net.time_embed(tmap)  # (T, W): one row per diffusion index
    # y = c_emb + t_emb[i] enters the MLP only through the adaLN linears, and every y is known
    # up front: compute their outputs for a block of diffusion steps in one matmul (T_blk * N
    # rows) instead of T matrix-vector products that each re-read those weights (over half
    # the head's parameters). Blocks are sized to keep the buffer under MODULATION_BUDGET.
    per_step = len(z) * net.modulation_width
    block = max(1, min(num_t, MODULATION_BUDGET // per_step))
    mods: list[Tensor] = []
    lo = num_t
    x = x_T
    for i in reversed(range(num_t)):
        if i < lo:  # the next block of diffusion steps [lo, i]
            lo = max(0, i + 1 - block)
            mods = net.modulations(c_emb[None] + t_emb[lo : i + 1, None])  # each (blk, N, kW)
        mod = [m[i - lo] for m in mods]
        if cfg is None:
            out = net.forward_modulated(x, mod).float()
            eps, v = out[:, :channels], out[:, channels:]
        else:
            out = net.forward_modulated(torch.cat([x, x]), mod).float()
            cond_eps, uncond_eps = out[:, :channels].chunk(2)
            eps = uncond_eps + cfg * (cond_eps - uncond_eps)
            v = out[: len(x), channels:]
        x = ddpm_step(coef, i, x, eps, v, step_noise[num_t - 1 - i], temperature)
    return x


def ddpm_step(
    coef: dict[str, Tensor], i: int, x: Tensor, eps: Tensor, v: Tensor, noise: Tensor, temp: Tensor
) -> Tensor:
    """x_{i-1} from x_i given the net's eps and variance interpolation v (learned range)."""
    frac = (v + 1) / 2
    log_var = frac * coef["log_betas"][i] + (1 - frac) * coef["posterior_log_variance_clipped"][i]
    x0 = coef["sqrt_recip_alphas_cumprod"][i] * x - coef["sqrt_recipm1_alphas_cumprod"][i] * eps
    mean = coef["posterior_mean_coef1"][i] * x0 + coef["posterior_mean_coef2"][i] * x
    if i > 0:
        return mean + torch.exp(0.5 * log_var) * noise * temp
    return mean
