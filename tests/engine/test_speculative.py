"""The self-speculative head (engine/eval/speculative.py): its chains have the exact head's
distribution (a two-sample test that the unverified draft fails), it takes fewer sequential
MLP calls and never fewer MLP evaluations than exact sampling."""

from __future__ import annotations

import pytest
import torch

from engine.eval.speculative import (
    Head,
    exact_chains,
    residual,
    speculative_chains,
    two_sample_test,
)
from engine.pipeline import Pipeline


@pytest.fixture(scope="module")
def head() -> Head:
    pipe = Pipeline.load("digits", device="cpu")
    z = torch.randn(
        4, pipe.model.config.decoder_embed_dim, generator=torch.Generator().manual_seed(0)
    )
    return Head(pipe.model.diffloss, z, torch.full((2,), 4.0), 1.0)  # 2 tokens, guided


def test_speculative_chains_keep_the_exact_distribution_and_the_draft_does_not(head):
    g = torch.Generator().manual_seed(1)
    token = torch.arange(2).repeat_interleave(600)
    exact = exact_chains(head, token, g)
    spec, st = speculative_chains(head, token, g, gamma=4)
    draft, _ = speculative_chains(head, token, g, gamma=4, verify=False)
    for t in range(2):
        assert two_sample_test(exact[token == t], spec[token == t]) > 0.01
        assert two_sample_test(exact[token == t], draft[token == t]) < 1e-3  # the test has power
    report = st.to_dict()
    assert 0 < report["acceptance"] < 1
    assert report["sequential_calls_vs_exact"] < 0.8  # depth falls ...
    assert report["mlp_rows_vs_exact"] >= 1.0  # ... FLOPs never do


def test_the_residual_draw_avoids_where_the_draft_already_put_its_mass():
    g = torch.Generator().manual_seed(2)
    n = 4000
    mp, sp = torch.zeros(n, 1), torch.ones(n, 1)
    mq, sq = torch.full((n, 1), 1.0), torch.ones(n, 1)
    y = residual(mp, sp, mq, sq, g)
    # max(0, N(0,1) - N(1,1)) lives where x < 0.5: all of it, and its mean is well below 0
    assert (y < 0.5).all() and y.mean() < -0.5
