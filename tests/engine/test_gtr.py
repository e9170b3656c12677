"""GtR's two-stage order and FTS: their schedules, no step generates two neighbouring tokens,
FTS moves head steps without adding any, and the energy that ranks tokens is a local
high-pass. Off is exact MAR and on is a real change for both, with every other knob, in
test_turbo.py."""

from __future__ import annotations

import pytest
import torch

from engine.decode.gtr import (
    FtsConfig,
    GtrConfig,
    fts_split,
    high_frequency_energy,
    structure_mask,
    two_stage_order,
    two_stage_plan,
)
from engine.decode.head import HeadConfig, HeadPolicy
from engine.decode.policy import PRESETS, DecodeConfig
from engine.decode.randomness import request_randomness
from engine.decode.schedules import step_plan
from engine.decode.step import StepEngine
from engine.model.config import SamplingParams

GUIDED = SamplingParams(num_iter=8, cfg=3.0)
TWO_STAGE = GtrConfig(structure_share=0.5, reconstruction_steps=2)


@pytest.mark.parametrize(
    ("num_iter", "share", "k", "structure_steps"),
    [(64, 0.25, 1, 16), (64, 0.5, 2, 32), (128, 0.25, 2, 32), (8, 0.5, 2, 4), (3, 0.1, 1, 1)],
)
def test_two_stage_plan_generates_the_structure_half_then_the_rest(
    num_iter, share, k, structure_steps
):
    plan = two_stage_plan(num_iter, 256, GtrConfig(share, k))
    assert len(plan) == structure_steps + k == GtrConfig(share, k).structure_steps(num_iter) + k
    assert [s.index for s in plan] == list(range(len(plan)))
    stages = [s.stage for s in plan]
    assert stages == [0] * structure_steps + [1] * k
    assert sum(s.num_pred for s in plan if s.stage == 0) == 128
    assert sum(s.num_pred for s in plan if s.stage == 1) == 128
    unknown = 256
    for s in plan:  # each step starts where the last left off; mask_len is what stays unknown
        assert s.unknown_before == unknown and s.num_pred >= 1
        unknown -= s.num_pred
        assert s.mask_len == unknown
    assert unknown == 0


def test_each_stage_follows_mars_own_schedule_over_its_half():
    plan = two_stage_plan(64, 256, GtrConfig(0.5, 4))
    structure = [s.num_pred for s in plan if s.stage == 0]
    reconstruction = [s.num_pred for s in plan if s.stage == 1]
    assert structure == [s.num_pred for s in step_plan(32, 128)]
    assert reconstruction == [s.num_pred for s in step_plan(4, 128)]
    assert two_stage_plan(64, 256, GtrConfig(0.5, 1))[-1].num_pred == 128  # K = 1


def test_structure_mask_is_a_checkerboard():
    mask = structure_mask(256).view(16, 16)
    assert mask.sum() == 128 and mask[0, 0] and not mask[0, 1] and not mask[1, 0]
    assert (mask[:, 1:] != mask[:, :-1]).all() and (mask[1:] != mask[:-1]).all()
    with pytest.raises(ValueError, match="square"):
        structure_mask(200)


def test_two_stage_order_puts_the_structure_half_in_the_tail_in_its_own_order():
    structure = structure_mask(256)
    order = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    out = two_stage_order(order, structure)
    assert sorted(out.tolist()) == list(range(256))
    assert structure[out[128:]].all() and not structure[out[:128]].any()
    assert out[128:].tolist() == [p for p in order.tolist() if structure[p]]
    assert out[:128].tolist() == [p for p in order.tolist() if not structure[p]]


def test_no_step_generates_two_neighbouring_tokens(deep):
    engine = StepEngine(deep, capacity=1)
    randomness = request_randomness((4,), 256, deep.config.token_embed_dim, 100, "cpu")
    row = engine.admit(3, GUIDED, DecodeConfig(gtr=TWO_STAGE), randomness[0])
    structure = structure_mask(256)
    assert row.num_steps == 4 + 2 and len(row.steps) == 6
    seen = 0
    for step in row.steps:
        pred = row.order[step.unknown_before - step.num_pred : step.unknown_before]
        assert (structure[pred] == (step.stage == 0)).all()  # one half per step
        grid = torch.zeros(256, dtype=torch.bool)
        grid[pred] = True
        grid = grid.view(16, 16)
        assert not (grid[:, 1:] & grid[:, :-1]).any() and not (grid[1:] & grid[:-1]).any()
        seen += len(pred)
    assert seen == 256


def test_high_frequency_energy_is_the_variance_of_the_known_neighbours():
    tokens = torch.zeros(256, 4)
    tokens.view(16, 16, 4)[:, 8:] = 1.0  # an edge between columns 7 and 8
    known = structure_mask(256)
    energy = high_frequency_energy(tokens, known).view(16, 16)
    # (5, 8) is unknown; its known neighbours (4, 8), (6, 8), (5, 9) are 1 and (5, 7) is 0:
    # per channel mean 0.75, variance 0.1875, over 4 channels 0.75
    assert energy[5, 8] == pytest.approx(0.75)
    assert energy[5, 2] == 0 and energy[5, 12] == 0  # flat regions
    lonely = torch.zeros(256, dtype=torch.bool)
    lonely[0] = True  # one known neighbour: no variance to measure
    assert high_frequency_energy(tokens, lonely).view(16, 16)[0, 1] == 0


def test_fts_split_ranks_by_energy():
    energy = torch.tensor([0.0, 5.0, 1.0, 3.0, 2.0])
    high, low = fts_split(energy, torch.tensor([0, 1, 2, 3, 4]), 2)
    assert high.tolist() == [1, 3] and low.tolist() == [4, 2, 0]


def test_fts_moves_head_steps_without_adding_any(deep):
    with pytest.raises(ValueError, match="move"):
        FtsConfig(share=0.5, high=1.5, low=0.8)
    fts = FtsConfig(share=0.25, high=2.0, low=2 / 3)
    policy, head = HeadPolicy(HeadConfig(upper=20)), deep.diffloss
    base = policy.schedule(head, 3, 8).num_timesteps
    high = policy.schedule(head, 3, 8, fts.high).num_timesteps
    low = policy.schedule(head, 3, 8, fts.low).num_timesteps
    assert (base, high, low) == (20, 40, 13)  # rounded down
    for k in range(1, 40):  # a step's total never exceeds its unweighted one
        num_high = fts.high_count(k)
        assert num_high * high + (k - num_high) * low <= k * base
    native = head.gen_schedule.num_timesteps  # never more than the model's own steps
    assert HeadPolicy().schedule(head, 3, 8, 2.0).num_timesteps == native


def test_gtr_runs_s_plus_k_steps():
    assert PRESETS["fast"].num_steps(64) == 32 + 8 and PRESETS["quality"].num_steps(64) == 32 + 16
    assert DecodeConfig().num_steps(64) == PRESETS["turbo"].num_steps(64) == 64
