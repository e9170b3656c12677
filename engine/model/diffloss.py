"""MAR's DiffLoss head: the small MLP denoiser (`SimpleMLPAdaLN`) and its diffusion schedule.

Key names match upstream (`diffloss.net.*`). Its DDPM sampling loop is decoding, not the
model: `engine/decode/passes/head.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model.diffusion import DiffusionSchedule

MODULATION_BUDGET = 1 << 24  # elements of precomputed adaLN outputs per block of steps


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def scale_plus_one(bias: Tensor, width: int) -> Tensor:
    """An adaLN bias (shift, scale[, gate]) with the 1 of (1 + scale) folded into its scale."""
    return torch.cat([bias[:width], bias[width : 2 * width] + 1, bias[2 * width :]])


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
        """Features of the lazy steps' adaLN outputs (`modulation_pieces(y, gates_only=True)`):
        W per res block, 2W for the final layer."""
        width = self.input_proj.out_features
        return (len(self.res_blocks) + 2) * width

    def modulation_pieces(self, y: Tensor, gates_only: bool = False) -> list[list[Tensor]]:
        """Per step of y (blk, R, W): every layer's adaLN output as `forward_lean` takes it, a
        list of (R, W) pieces: (shift, 1 + scale, gate) per res block, then (shift, 1 + scale)
        for the final layer; `gates_only` (the head cache's lazy steps): each res block's gate,
        then the final layer's two. One SiLU and one matmul per layer for the whole block of
        steps (the 1 of 1 + scale rides in the bias); the pieces are views, no copy."""
        width, blk = self.input_proj.out_features, y.shape[0]
        per_layer: list[list[tuple[Tensor, ...]]] = []
        for out in self._adaln_outputs(y, gates_only):  # (blk, R, kW)
            out = out.view(blk, out.shape[1], -1, width)  # (blk, R, k, W)
            per_layer.append([p.unbind(0) for p in out.permute(2, 0, 1, 3).unbind(0)])  # [k][blk]
        return [[piece[j] for layer in per_layer for piece in layer] for j in range(blk)]

    def packed_modulations(self, y: Tensor) -> Tensor:
        """`modulation_pieces(y)` as one tensor (blk, R, modulation_width) per block of steps
        (for a traced step, whose inputs may not alias: `unpack_modulations` views it)."""
        return torch.cat(self._adaln_outputs(y), dim=-1)

    def _adaln_outputs(self, y: Tensor, gates_only: bool = False) -> list[Tensor]:
        """Every layer's adaLN output for y (blk, R, W), (blk, R, kW) each: one SiLU, then one
        matmul per layer, the 1 of 1 + scale in its bias; `gates_only`: each res block's gate
        (k = 1), the final layer's shift and scale in full."""
        width = self.input_proj.out_features
        act = F.silu(y)
        outs = []
        for layer in [*self.res_blocks, self.final_layer]:
            linear = layer.adaLN_modulation[-1]
            weight, bias = linear.weight, linear.bias
            if gates_only and layer is not self.final_layer:
                weight, bias = weight[2 * width :], bias[2 * width :]  # the gate only
            else:  # (shift, scale[, gate]): scale + 1
                bias = scale_plus_one(bias, width)
            outs.append(F.linear(act, weight, bias))
        return outs

    def unpack_modulations(self, mods: Tensor) -> list[Tensor]:
        """One step's packed modulations (R, modulation_width) -> `forward_lean`'s pieces."""
        width = self.input_proj.out_features
        return list(mods.view(mods.shape[0], -1, width).unbind(1))

    def lean_weights(self) -> tuple[Tensor, ...]:
        """The weights as `forward_lean` takes them, linears transposed once (views): addmm
        with a pre-transposed weight is F.linear without its per-call transpose."""
        weights = [self.input_proj.weight.t(), self.input_proj.bias]
        for block in self.res_blocks:
            first, second = block.mlp[0], block.mlp[2]
            weights += [block.in_ln.weight, block.in_ln.bias, first.weight.t(), first.bias,
                        second.weight.t(), second.bias]  # fmt: skip
        final = self.final_layer.linear
        return (*weights, final.weight.t(), final.bias)

    def forward_lean(
        self,
        x: Tensor,
        pieces: list[Tensor],
        weights: tuple[Tensor, ...],
        guided: bool,
        keep: list[Tensor] | None = None,
    ) -> Tensor:
        """`forward_modulated` in the fewest eager ops: `pieces` are every layer's adaLN
        outputs split per use, (shift, 1 + scale, gate) per res block then (shift, 1 + scale)
        for the final layer, each (R, W); `weights` are `lean_weights()`. x (N, C) is fed to
        both CFG halves when `guided` (R = 2N). Two fused ops per modulation (addcmul), three
        per MLP (addmm, silu_, addmm), one LayerNorm: 6 ops per res block, no views.
        `keep` collects each block's MLP output for the first N rows (the head cache)."""
        width = self.input_proj.out_features
        h = torch.addmm(weights[1], x, weights[0])
        if guided:  # the same rows for both halves: project once, then repeat
            h = torch.cat([h, h])
        for j in range(len(self.res_blocks)):
            ln_w, ln_b, w1, b1, w2, b2 = weights[2 + 6 * j : 8 + 6 * j]
            shift, scale1, gate = pieces[3 * j : 3 * j + 3]
            u = torch.addcmul(shift, F.layer_norm(h, (width,), ln_w, ln_b, 1e-6), scale1)
            a = F.silu(torch.addmm(b1, u, w1), inplace=True)
            m = torch.addmm(b2, a, w2)
            if keep is not None:
                keep.append(m[: len(x)])
            h = torch.addcmul(h, gate, m)
        return self.final_lean(h, pieces[-2], pieces[-1], weights)

    def final_lean(
        self, h: Tensor, shift: Tensor, scale1: Tensor, weights: tuple[Tensor, ...]
    ) -> Tensor:
        """The final layer in 3 ops, given its shift and 1 + scale (R, W)."""
        width = self.input_proj.out_features
        u = torch.addcmul(shift, F.layer_norm(h, (width,), None, None, 1e-6), scale1)
        return torch.addmm(weights[-1], u, weights[-2])

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
