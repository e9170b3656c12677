"""Tokens <-> images: upstream's patch layout, and decoding through the KL-16 VAE."""

from __future__ import annotations

import dataclasses

import torch

from engine.model.config import MAR_DIGITS, MAR_TINY
from engine.model.tokenizer import KL16Tokenizer, PixelTokenizer, patchify, unpatchify
from engine.model.vae import LATENT_SCALE, VAEConfig, load_vae


def test_patch_size_one_is_channel_last_row_major():
    tokens = torch.randn(2, 64, 16)
    latent = unpatchify(tokens, 16, 1)
    assert latent.shape == (2, 16, 8, 8)
    assert torch.equal(latent[1, :, 3, 5], tokens[1, 3 * 8 + 5])  # README token layout


def test_patchify_layout_and_round_trip():
    images = torch.arange(2 * 1 * 32 * 32, dtype=torch.float32).view(2, 1, 32, 32)
    tokens = patchify(images, 2)
    assert tokens.shape == (2, 256, 4)
    # token (i, j) holds pixels (2i..2i+1, 2j..2j+1), row-major within the patch
    i, j = 3, 7
    patch = images[0, 0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].flatten()
    assert torch.equal(tokens[0, i * 16 + j], patch)
    assert torch.equal(unpatchify(tokens, 1, 2), images)


def test_pixel_tokenizer_gives_digits_images():
    tok = PixelTokenizer(MAR_DIGITS)
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    assert torch.equal(tok.decode(tok.encode(images)), images)


def test_kl16_tokenizer_unscales_then_decodes(ref, load_golden):
    vae = load_vae(ref / "tiny_vae_weights.safetensors", VAEConfig(ch=32))
    golden = load_golden("tiny_vae_decode.safetensors")
    latent = golden["decode.latent"]  # (1, 16, 8, 8), already on the VAE scale
    tokens = latent.permute(0, 2, 3, 1).reshape(1, 64, 16) * LATENT_SCALE  # MAR's scaled tokens
    config = dataclasses.replace(MAR_TINY)  # 8x8 tokens of dim 16, patch 1
    images = KL16Tokenizer(config, vae).decode(tokens)
    torch.testing.assert_close(images, golden["decode.image"], atol=5e-5, rtol=1e-5)
