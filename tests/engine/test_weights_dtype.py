"""bf16 weights cast once at load: the same tokens as autocast casting them every call."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from engine.decode.policy import MODES, make_policy
from engine.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipes() -> tuple[Pipeline, Pipeline]:
    cast = Pipeline.load("digits", device="cpu", dtype="bf16")
    every_call = Pipeline.load("digits", device="cpu", dtype="fp32")
    every_call.dtype = torch.bfloat16  # the same autocast, the weights left in fp32
    return cast, every_call


def test_matmul_weights_are_stored_in_the_compute_dtype_and_the_rest_in_fp32(pipes):
    cast, every_call = pipes
    linears = {n: m for n, m in cast.model.named_modules() if isinstance(m, nn.Linear)}
    adaln = {n for n in linears if "adaLN_modulation" in n}  # once per AR step: kept fp32
    assert adaln and len(linears) > len(adaln)
    for name, linear in linears.items():
        want = torch.float32 if name in adaln else torch.bfloat16
        assert all(p.dtype == want for p in linear.parameters()), name
    norms = [m for m in cast.model.modules() if isinstance(m, nn.LayerNorm | nn.Embedding)]
    assert all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in every_call.model.parameters())
    fp32 = Pipeline.load("digits", device="cpu", dtype="fp32")
    assert all(p.dtype == torch.float32 for p in fp32.model.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_cast_weights_give_the_tokens_autocast_gives(pipes, mode):
    cast, every_call = pipes
    params = replace(cast.spec.defaults, num_iter=8)
    tokens = [
        pipe.generate_tokens([3, 7], [0, 1], params=params, policy=make_policy(mode))
        for pipe in (cast, every_call)
    ]
    torch.testing.assert_close(tokens[0], tokens[1], atol=0, rtol=0)
