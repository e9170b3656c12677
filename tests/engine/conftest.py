"""Engine test fixtures: small random models with room for every cache to matter."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.decode.randomness import request_randomness
from engine.decode.sampler import sample_tokens
from engine.model.config import MAR_DIGITS, SamplingParams
from engine.model.mar import MAR


@pytest.fixture(scope="module")
def deep() -> MAR:
    """A random digits-shaped model: 256 tokens, 4 decoder layers (room for cached layers)."""
    torch.manual_seed(0)
    config = dataclasses.replace(MAR_DIGITS, encoder_depth=2, decoder_depth=4)
    model = MAR(config).eval()
    with torch.no_grad():  # upstream init zeroes the head; give it something to say
        for p in model.diffloss.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def run(model: MAR, policy, params, classes=(3, 5), seeds=(1, 2), on_step=None, units=None):
    """Tokens of one batch; `params` is one SamplingParams for every row or one per row;
    `units`: the phases that run as units (None: eager)."""
    if isinstance(params, SamplingParams):
        params = [params] * len(classes)
    rng = request_randomness(seeds, model.config.seq_len, model.config.token_embed_dim, 100, "cpu")
    return sample_tokens(
        model, torch.tensor(classes), params, rng, policy, on_step=on_step, units=units
    )
