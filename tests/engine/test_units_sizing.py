"""Buckets sized by the batch a service admits: every call of such a batch finds a unit."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.decode.gtr import GtrConfig
from engine.decode.policy import MODES, PRESETS, make_policy
from engine.decode.units.build import most_tokens_per_step, powers_of_two, sized_buckets
from engine.pipeline import Pipeline


def test_powers_of_two_reach_the_size():
    assert powers_of_two(1) == (1,)
    assert powers_of_two(5) == (1, 2, 4, 8)
    assert powers_of_two(256)[-1] == 256
    with pytest.raises(ValueError):
        powers_of_two(0)


def test_gtr_reconstruction_steps_are_the_largest():
    mar = PRESETS["mar"]
    gtr = replace(PRESETS["turbo"], gtr=GtrConfig(0.5, 8))
    assert most_tokens_per_step(256, 64, [mar]) == 7  # MAR-B's cosine schedule, 64 steps
    assert most_tokens_per_step(256, 64, [mar, gtr]) == 24  # 128 tokens in 8 steps


def test_a_batch_of_128_on_mar_b_is_held_by_its_buckets():
    head, passes = sized_buckets(256, 64, 128, PRESETS.values())
    assert passes[-1] == 256  # both CFG halves of 128 images
    assert head[-1] >= 128 * most_tokens_per_step(256, 64, PRESETS.values())


def test_every_call_of_an_admitted_batch_runs_as_a_unit():
    pipe = Pipeline.load("digits", units="static", max_batch_size=2)
    for mode in MODES:  # at the model's default steps, the ones the buckets are sized for
        pipe.generate([3, 7], [0, 1], policy=make_policy(mode))
    families = pipe.units.families()
    assert all(units is not None for units in families.values())
    assert all(u.stats.hits > 0 and u.stats.misses == 0 for u in families.values())


def test_a_batch_above_the_sized_one_runs_eager_and_is_counted():
    pipe = Pipeline.load("digits", units="static", max_batch_size=1)
    params = replace(pipe.spec.defaults, num_iter=4)
    pipe.generate([3, 7], [0, 1], params=params, policy=make_policy("mar"))
    assert pipe.units.full.stats.misses > 0 and pipe.units.head.stats.misses > 0
