"""MARché decoding: exact when every token is active, a real approximation otherwise."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine.decode.marche import MarcheConfig
from engine.decode.passes.common import Call
from engine.decode.passes.lazy import active_slots
from engine.decode.policy import DecodeConfig, make_policy
from engine.decode.randomness import request_randomness
from engine.decode.sampler import sample_tokens
from engine.model.config import MAR_TINY, SamplingParams
from engine.model.mar import MAR
from tests.engine.conftest import run


@pytest.fixture(scope="module")
def tiny(ref) -> MAR:
    model = MAR(MAR_TINY).eval()
    model.load_state_dict(load_file(str(ref / "tiny_weights_perturbed.safetensors")))
    return model


GUIDED = SamplingParams(num_iter=8, cfg=3.0)
PLAIN = SamplingParams(num_iter=16, cfg=1.0)


@pytest.mark.parametrize("params", [GUIDED, PLAIN], ids=["cfg3", "cfg1"])
@pytest.mark.parametrize("encoder", ["full", "cache"])
def test_budget_covering_all_tokens_equals_baseline(tiny, params, encoder):
    baseline = run(tiny, make_policy("mar"), params)
    all_tokens = tiny.config.buffer_size + tiny.config.seq_len
    cfg = MarcheConfig(budget=all_tokens, selection_layer=1, refresh_period=100, encoder=encoder)
    policy = make_policy(DecodeConfig(marche=cfg))
    out = run(tiny, policy, params)
    torch.testing.assert_close(out, baseline, atol=1e-5, rtol=1e-5)
    assert policy.stats and all(f == 1.0 for f in policy.stats)


@pytest.mark.parametrize("encoder", ["full", "cache"])
def test_refresh_every_step_equals_baseline(deep, encoder):
    baseline = run(deep, make_policy("mar"), GUIDED)
    policy = make_policy(
        DecodeConfig(marche=MarcheConfig(budget=8, refresh_period=1, encoder=encoder))
    )
    torch.testing.assert_close(run(deep, policy, GUIDED), baseline, atol=1e-5, rtol=1e-5)


def test_cache_aware_attention_equals_full_attention_when_all_active(deep):
    """One decoder layer: active path over a cache holding every token's fresh K/V."""
    block = deep.decoder_blocks[2]
    x = torch.randn(2, 272, 96)
    k_pool = torch.empty(5, 272, 4, 24)  # a pool with other rows; ours are 3 and 1
    v_pool = torch.empty_like(k_pool)
    rows = torch.tensor([3, 1])
    perm = torch.stack([torch.randperm(272) for _ in range(2)])  # any slot order
    flat = (rows[:, None] * 272 + perm).flatten()
    with torch.no_grad():
        full = block(x)
        active = block.forward_active(
            torch.gather(x, 1, perm[..., None].expand(-1, -1, 96)), flat, k_pool, v_pool, rows
        )
    expected = torch.gather(full, 1, perm[..., None].expand(-1, -1, 96))
    torch.testing.assert_close(active, expected, atol=1e-5, rtol=1e-5)


def test_default_marche_is_an_approximation_with_a_smaller_active_set(deep):
    baseline = run(deep, make_policy("mar"), SamplingParams(num_iter=32, cfg=3.0))
    policy = make_policy("marche")
    out = run(deep, policy, SamplingParams(num_iter=32, cfg=3.0))
    diff = (out - baseline).abs().max().item()
    assert diff > 1e-4  # cached K/V really are reused
    fractions = policy.stats
    assert fractions[0] == 1.0 and fractions[3] == 1.0  # first step and every 3rd: full
    assert all(f == 64 / 272 for i, f in enumerate(fractions) if i % 3)  # fixed budget


@pytest.mark.parametrize(
    "ablation",
    [
        MarcheConfig(caching_tokens=False),
        MarcheConfig(refresh="random"),
        MarcheConfig(refresh="low_attention"),
        MarcheConfig(encoder="full"),
        MarcheConfig(selection_layer=1, budget=32),
    ],
    ids=["no-caching-tokens", "random-refresh", "low-attention-refresh", "encoder-full", "l1-b32"],
)
def test_ablations_run_and_differ_from_default(deep, ablation):
    params = SamplingParams(num_iter=16, cfg=3.0)
    default = run(deep, make_policy("marche"), params)
    out = run(deep, make_policy(DecodeConfig(marche=ablation)), params)
    assert out.shape == default.shape and torch.isfinite(out).all()
    assert (out - default).abs().max() > 0


def _call(pred, prev=None) -> Call:
    prev = None if prev is None else torch.tensor(prev)
    return Call(0, 0, None, torch.zeros(0, dtype=torch.long), torch.tensor(pred), prev)


def test_active_set_is_distinct_and_starts_with_generating_tokens():
    scores = torch.zeros(1, 20)
    scores[0, [3, 7, 12, 14]] = torch.tensor([0.5, 0.9, 0.7, 0.1])
    scores[0, 2 + 9] = 5.0  # a caching token with high attention must not be picked twice
    active, counts = active_slots(scores, [_call([1, 5], [4, 9])], 2, MarcheConfig(budget=6))
    # generating [3, 7], caching [6, 11], then the top-2 of the rest: 12 (0.7), 14 (0.1)
    assert active.tolist() == [[3, 7, 6, 11, 12, 14]] and counts == [6]


def test_ragged_active_sets_are_each_rows_own():
    """Rows with different token counts pad with their first generating slot; each row's
    distinct set is the one it gets alone."""
    torch.manual_seed(0)
    scores = torch.rand(2, 30)
    calls = [_call([1, 5, 8], [4, 9]), _call([2])]
    config = MarcheConfig(budget=7)
    together, counts = active_slots(scores, calls, 2, config)
    assert counts == [7, 7]
    for i, call in enumerate(calls):
        alone, _ = active_slots(scores[i : i + 1], [call], 2, config)
        assert set(together[i].tolist()) == set(alone[0].tolist())
        assert together[i, : len(call.pred)].tolist() == (2 + call.pred).tolist()


def test_config_validation():
    with pytest.raises(ValueError):
        MarcheConfig(refresh="sometimes")
    with pytest.raises(ValueError):
        MarcheConfig(budget=0)
    with pytest.raises(ValueError, match="mode"):
        make_policy("warp")


@pytest.mark.parametrize("mode", ["mar", "marche"])
@pytest.mark.parametrize("params", [GUIDED, PLAIN], ids=["cfg3", "cfg1"])
def test_retiring_a_row_mid_run_leaves_its_batch_mates_unchanged(deep, mode, params):
    classes, seeds = (3, 5, 7), (1, 2, 3)
    full = run(deep, make_policy(mode), params, classes, seeds)
    drop_after = 2

    def on_step(info):
        return [True, False, True] if info.step == drop_after else None

    rng = request_randomness(seeds, deep.config.seq_len, deep.config.token_embed_dim, 100, "cpu")
    out = sample_tokens(
        deep, torch.tensor(classes), [params] * 3, rng, make_policy(mode), on_step=on_step
    )
    assert out.shape[0] == 2
    torch.testing.assert_close(out, full[[0, 2]], atol=1e-5, rtol=1e-5)


def test_retiring_every_row_stops_the_run(deep):
    steps = []

    def on_step(info):
        steps.append(info.step)
        return [False, False]

    rng = request_randomness((1, 2), deep.config.seq_len, deep.config.token_embed_dim, 100, "cpu")
    out = sample_tokens(
        deep, torch.tensor((3, 5)), [GUIDED] * 2, rng, make_policy("marche"), on_step=on_step
    )
    assert out.shape[0] == 0 and steps == [0]
