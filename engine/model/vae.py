"""The KL-16 VAE used by MAR (`models/vae.py` of LTH14/mar, itself adapted from LDM).

A plain re-implementation whose state-dict keys equal the official ones, so `kl16.ckpt`
loads strictly. MAR decodes `vae.decode(tokens / LATENT_SCALE)`; pixels come out in [-1, 1].
No randomness: `encode` returns the Gaussian's mean and clamped log-variance, not a sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model.checkpoint import load_strict, read_state_dict

LATENT_SCALE = 0.2325  # MAR's scale factor: tokens = latent * 0.2325


@dataclass(frozen=True)
class VAEConfig:
    """Shape of an LDM-style `AutoencoderKL` (KL-16 by default)."""

    embed_dim: int = 16  # latent channels (z_channels == embed_dim for KL-16)
    ch: int = 128  # base width
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    encoder_attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256
    in_channels: int = 3
    out_channels: int = 3


KL16 = VAEConfig()


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm → swish → conv3x3, twice, plus a (1x1-projected when widths differ) skip."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:  # (B, in_ch, H, W) -> (B, out_ch, H, W)
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))  # dropout is 0
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = group_norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> same
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # (B, N, C)
        k = self.k(h).reshape(b, c, hh * ww)  # (B, C, N)
        v = self.v(h).reshape(b, c, hh * ww)  # (B, C, N)
        w = torch.bmm(q, k) * (int(c) ** -0.5)  # (B, N_q, N_k)
        w = torch.softmax(w, dim=2)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)  # (B, C, N_q) -> (B,C,H,W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock → AttnBlock → ResnetBlock at the lowest resolution."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block.{j}`, optional `attn.{j}`, then an optional resampler."""

    def __init__(self, blocks: list[ResnetBlock], attn: list[AttnBlock]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)  # empty, or one per block

    def forward(self, x: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[j](x)
        return x


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2*embed_dim, H/2^(L-1), W/2^(L-1)) (mean and logvar)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        in_mult = (1, *config.ch_mult)
        res = config.resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(config.ch_mult):
            block_in, block_out = config.ch * in_mult[i], config.ch * mult
            blocks, attn = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in config.encoder_attn_resolutions:
                    attn.append(AttnBlock(block_out))
            level = Level(blocks, attn)
            if i != len(config.ch_mult) - 1:
                level.downsample = Downsample(block_out)
                res //= 2
            self.down.append(level)
        top = config.ch * config.ch_mult[-1]
        self.mid = MidBlock(top)
        self.norm_out = group_norm(top)
        self.conv_out = nn.Conv2d(top, 2 * config.embed_dim, 3, padding=1)  # double_z

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, embed_dim, h, w) -> (B, out_channels, h*2^(L-1), w*2^(L-1)); no attention in `up`.

    `up.0` is the highest resolution (width ch*ch_mult[0]); `up.{L-1}` the lowest, run first.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        block_in = config.ch * config.ch_mult[-1]
        self.conv_in = nn.Conv2d(config.embed_dim, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        levels: list[Level] = []
        for i in reversed(range(len(config.ch_mult))):
            block_out = config.ch * config.ch_mult[i]
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            level = Level(blocks, [])
            if i != 0:
                level.upsample = Upsample(block_out)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))  # no tanh


class AutoencoderKL(nn.Module):
    """MAR's KL VAE: `encode` gives (mean, clamped logvar); `decode` maps latents to pixels."""

    def __init__(self, config: VAEConfig = KL16) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.embed_dim, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.embed_dim, 1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [-1, 1] -> mean, logvar, each (B, embed_dim, H/16, W/16)."""
        moments = self.quant_conv(self.encoder(x))  # (B, 2*embed_dim, h, w)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """(B, embed_dim, h, w) on the VAE scale (tokens / LATENT_SCALE) -> (B, 3, 16h, 16w)."""
        return self.decoder(self.post_quant_conv(z))


def load_vae(
    path: str | Path, config: VAEConfig = KL16, device: str | torch.device = "cpu"
) -> AutoencoderKL:
    """Build the VAE and load `kl16.ckpt` (`{"model": ...}`) or flat safetensors strictly."""
    sd = read_state_dict(path, prefer=("model",))
    sd = {k: v.float() for k, v in sd.items()}
    with torch.device("meta"):  # skip the random init: no RNG use, no wasted time
        vae = AutoencoderKL(config)
    vae = vae.to_empty(device="cpu")
    # Strict: every parameter is overwritten (the VAE has no buffers), so to_empty is safe.
    load_strict(vae, sd, what=f"VAE checkpoint {path}")
    return vae.to(device).eval()


def to_uint8(images: Tensor) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), as clip(round((x + 1) / 2 * 255)).

    `torch.round` rounds half to even, like `np.round` in the official evaluation.
    """
    x = torch.round((images.float() + 1.0) / 2.0 * 255.0)
    return x.clamp(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
