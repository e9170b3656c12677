"""MARché's lazy passes as units (`engine/decode/units/lazy.py`): positions computed on the
device from a per-call plan and the slot's order, padded to buckets of calls, appended, known
and active tokens. Every MARché mode and knob equals eager, pad rows write nothing but the
scratch row, what no unit serves runs eager and is counted, and nothing is compiled while
serving. (Batch and pad independence: tests/engine/test_units_full.py; CUDA: test_cuda.py.)"""

from __future__ import annotations

import gc

import pytest
import torch

from engine.decode.marche import MarcheConfig
from engine.decode.policy import PRESETS, make_policy
from engine.decode.randomness import request_randomness
from engine.decode.sampler import sample_tokens
from engine.decode.step import StepEngine
from engine.decode.units.build import transformer_units
from engine.decode.units.common import Units
from engine.decode.units.lazy import LazyUnits, powers_of_two
from engine.model.config import SamplingParams
from tests.engine.test_step import GUIDED, assert_same_image, drive, rng


def run(model, policy, units, params=GUIDED):
    config = model.config
    randomness = request_randomness((1, 2), config.seq_len, config.token_embed_dim, 100, "cpu")
    return sample_tokens(model, torch.tensor((3, 5)), [params] * 2, randomness, policy,
                         units=units)  # fmt: skip


def lazy_steps(policy) -> int:
    return sum(active < 1.0 for active in policy.stats)


def test_buckets_are_powers_of_two_up_to_the_sequence_and_the_slots(deep):
    lazy = transformer_units(deep, "static").lazy
    assert powers_of_two(6) == (1, 2, 4, 6) and powers_of_two(8) == (1, 2, 4, 8)
    assert lazy.appended == (1, 2, 4, 8, 16, 32, 64, 128, 256)  # tokens appended per row
    assert lazy.actives == (*lazy.appended, 272)  # buffer 16 + 256 tokens
    assert lazy.buckets == (1, 2, 4, 8, 16, 32) and lazy.lengths == tuple(range(32, 257, 32))


@pytest.mark.parametrize("mode", ["marche", "turbo", "fast"])
def test_every_lazy_pass_as_a_unit_equals_eager(deep, mode):
    units, policy = transformer_units(deep, "static"), make_policy(mode)
    tokens = run(deep, policy, units)
    assert_same_image(tokens, run(deep, make_policy(mode), None))
    assert units.lazy.stats.hits == lazy_steps(policy) > 0 and units.lazy.stats.misses == 0


@pytest.mark.parametrize(
    "knobs, params",
    [
        ({"refresh": "low_attention"}, GUIDED),
        ({"caching_tokens": False}, GUIDED),
        ({"selection_layer": 1, "budget": 16}, GUIDED),
        ({"selection_layer": 4, "refresh_period": 2}, GUIDED),  # no late layers
        ({"budget": 200}, GUIDED),  # active bucket 256: more than the known-token buckets
        ({}, SamplingParams(num_iter=4, cfg=1.0)),  # forced tokens above the budget
    ],
)
def test_marche_knobs_under_lazy_units_equal_eager(deep, knobs, params):
    units, policy = transformer_units(deep, "static"), make_policy("marche", MarcheConfig(**knobs))
    tokens = run(deep, policy, units, params)
    assert_same_image(tokens, run(deep, make_policy("marche", MarcheConfig(**knobs)), None, params))
    assert units.lazy.stats.hits == lazy_steps(policy) > 0 and units.lazy.stats.misses == 0


@pytest.mark.parametrize("knobs", [{"refresh": "random"}, {"encoder": "full"}])
def test_ablations_no_unit_serves_run_eager_and_are_counted(deep, knobs):
    units, policy = transformer_units(deep, "static"), make_policy("marche", MarcheConfig(**knobs))
    tokens = run(deep, policy, units)
    assert_same_image(tokens, run(deep, make_policy("marche", MarcheConfig(**knobs)), None))
    assert units.lazy.stats.hits == 0 and units.lazy.stats.misses == lazy_steps(policy) > 0


def test_pad_rows_write_only_the_scratch_row(deep):
    """Three images fill the pool; one more lazy step of one of them (2 rows, padded to a
    4-row bucket) changes its own cache rows and the scratch row, nobody else's."""
    units = transformer_units(deep, "static", buckets=(4, 8))
    engine = StepEngine(deep, 3, units=units)
    rows = [engine.admit(c, GUIDED, PRESETS["marche"], rng(deep, c)) for c in (1, 2, 3)]
    engine.step(rows)  # a full step: every cache filled
    pool = engine.pool
    before = {name: b.clone() for name, b in pool.buffers.items()}
    tokens = pool.tokens.clone()
    engine.step(rows[1:2])  # lazy
    assert (units.lazy.stats.hits, units.lazy.stats.padded_rows) == (1, 2)
    ours = [pool.cache_row(rows[1].slot, half) for half in (0, 1)]
    others = [r for r in range(2 * pool.capacity) if r not in ours]
    for name, buffer in pool.buffers.items():
        if name != "diff":  # the condition cache's, per image slot (not written when lazy)
            assert torch.equal(buffer[others], before[name][others]), name
            assert not torch.equal(buffer[ours], before[name][ours]), name
    assert torch.equal(pool.tokens[[0, 2]], tokens[[0, 2]])


def test_units_past_the_cap_are_not_built_and_their_passes_run_eager(deep):
    units, policy = transformer_units(deep, "static"), make_policy("marche")
    units.lazy.max_units = 2  # one lazy pass's append and decoder units
    assert_same_image(run(deep, policy, units), run(deep, make_policy("marche"), None))
    stats = units.lazy.stats
    assert stats.built == 2 and stats.hits >= 1 and stats.misses >= 1
    assert stats.hits + stats.misses == lazy_steps(policy)
    gc.collect()  # the batch's pool is gone, and its units with it: the cap counts live ones
    hits = stats.hits
    run(deep, make_policy("marche"), units)
    assert stats.built == 4 and stats.hits > hits


def test_lazy_units_are_never_compiled_while_serving(deep):
    """Under "compile" a lazy pass needs units bound to the serving pool, which do not exist
    at start-up: it runs eager (counted), nothing is compiled."""
    units, policy = (
        transformer_units(deep, "compile", buckets=(4,), lengths=(256,)),
        make_policy("marche"),
    )
    assert isinstance(units.lazy, LazyUnits)
    assert_same_image(run(deep, policy, units), run(deep, make_policy("marche"), None))
    assert units.lazy.stats.built == 0 and units.lazy.stats.misses == lazy_steps(policy) > 0


@pytest.mark.parametrize("mode", ["marche", "turbo"])
def test_units_built_mid_run_warm_up_on_the_call_they_serve(deep, mode, monkeypatch):
    """Before a capture, CUDA graphs run the unit twice (warm-up). A unit that writes the pool
    (a refill or a lazy pass) must warm up on the inputs of the call it is built for: stale
    or fresh (zero) buffers would write other rows' caches. Simulated on the CPU: every unit
    runs twice as it is built. Image B (16 steps) joins image A (8 steps) after A's first
    step, so B's refills need shapes A never had while A's lazy steps read A's caches."""

    def warmed_up(self, fn):
        fn(), fn()
        return fn

    def two_images(units) -> torch.Tensor:
        engine = StepEngine(deep, 2, units=units)
        a = engine.admit(3, GUIDED, PRESETS[mode], rng(deep, 1))
        engine.step([a])
        b = engine.admit(5, SamplingParams(16, cfg=3.0), PRESETS[mode], rng(deep, 2))
        drive(engine, [a, b], lambda: a.finished and b.finished)
        return engine.tokens([a, b])

    expected = two_images(None)
    monkeypatch.setattr(Units, "runner", warmed_up)
    units = transformer_units(deep, "static", lengths=range(8, 257, 8))
    assert_same_image(two_images(units), expected)
    assert units.lazy.stats.hits > 0 and units.full.stats.hits > 0
