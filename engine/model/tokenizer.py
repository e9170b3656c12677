"""Tokenizers: how a model's tokens (B, L, C) become images (B, ch, H, W) in [-1, 1].

* `PixelTokenizer`: tokens are raw pixel patches (our digits model).
* `KL16Tokenizer`: tokens are KL-16 VAE latents scaled by 0.2325 (the released MAR models).
Both use upstream's patch layout (`MAR.patchify` / `unpatchify`).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from engine.model.config import MARConfig


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, h*w, C*p*p), token index i*w + j, channel index c*p*p + pi*p + pj."""
    b, c, hh, ww = x.shape
    p = patch_size
    h, w = hh // p, ww // p
    x = x.reshape(b, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwcpq", x)
    return x.reshape(b, h * w, c * p * p)


def unpatchify(tokens: Tensor, channels: int, patch_size: int) -> Tensor:
    """(B, h*w, C*p*p) -> (B, C, h*p, w*p); the inverse of `patchify` (square grids)."""
    b, seq_len, _ = tokens.shape
    p = patch_size
    h = w = int(seq_len**0.5)
    x = tokens.reshape(b, h, w, channels, p, p)
    x = torch.einsum("nhwcpq->nchpwq", x)
    return x.reshape(b, channels, h * p, w * p)


class Tokenizer(Protocol):
    name: str

    def decode(self, tokens: Tensor) -> Tensor:
        """(B, L, C) tokens -> (B, ch, H, W) images, nominally in [-1, 1]."""
        ...


class PixelTokenizer:
    """Tokens are pixel patches in [-1, 1]."""

    name = "pixels"

    def __init__(self, config: MARConfig) -> None:
        self.channels, self.patch_size = config.vae_embed_dim, config.patch_size

    def encode(self, images: Tensor) -> Tensor:
        return patchify(images, self.patch_size)

    def decode(self, tokens: Tensor) -> Tensor:
        return unpatchify(tokens.float(), self.channels, self.patch_size)


class KL16Tokenizer:
    """Tokens are KL-16 latents times 0.2325; images come from the VAE decoder."""

    name = "kl16"

    def __init__(self, config: MARConfig, vae: torch.nn.Module, scale: float = 0.2325) -> None:
        self.channels, self.patch_size = config.vae_embed_dim, config.patch_size
        self.vae, self.scale = vae, scale

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        latents = unpatchify(tokens, self.channels, self.patch_size)  # (B, 16, 16, 16)
        return self.vae.decode(latents / self.scale).float()
