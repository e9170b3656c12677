"""The transformer's full pass as units per (call bucket, known-token bucket)
(`engine/decode/units/full.py`): every mode under the units equals eager (exact MAR's passes
and MARché's cache-filling ones, whose pad rows write to the pool's scratch row), a row's
image does not depend on its batch mates or on how many pad rows and pad tokens its passes
had, and passes no unit holds run eager and are counted."""

from __future__ import annotations

import pytest
import torch

from engine.decode.policy import MODES, PRESETS, make_policy
from engine.decode.randomness import request_randomness
from engine.decode.sampler import sample_tokens
from engine.decode.step import StepEngine
from engine.decode.units.build import build_full, measure_full, transformer_units
from engine.decode.units.full import FullUnits
from tests.engine.test_step import GUIDED, MATES, assert_same_image, drive, rng


def run(model, mode, units, classes=(3, 5), seeds=(1, 2)):
    randomness = request_randomness(
        seeds, model.config.seq_len, model.config.token_embed_dim, 100, "cpu"
    )
    return sample_tokens(model, torch.tensor(classes), [GUIDED] * len(classes), randomness,
                         make_policy(mode), units=units)  # fmt: skip


def test_the_default_buckets_cover_every_pass_of_a_batch_of_16(deep):
    units = FullUnits(deep, "static")
    assert units.buckets == (1, 2, 4, 8, 16, 32)  # 16 images x 2 CFG halves
    assert units.lengths == tuple(range(32, 257, 32))  # every L/8 known tokens


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_under_the_units_equals_eager(deep, mode):
    """Every full pass runs as a unit (padded tokens, masked; MARché's also fill the caches
    its lazy steps read): the tokens are eager's."""
    units = transformer_units(deep, "static")
    policy = make_policy(mode)
    randomness = request_randomness(
        (1, 2), deep.config.seq_len, deep.config.token_embed_dim, 100, "cpu"
    )
    tokens = sample_tokens(deep, torch.tensor((3, 5)), [GUIDED] * 2, randomness, policy,
                           units=units)  # fmt: skip
    assert_same_image(tokens, run(deep, mode, None))
    full_steps = sum(active == 1.0 for active in policy.stats)  # mar: every step
    assert units.full.stats.hits == full_steps > 0 and units.full.stats.misses == 0
    assert units.full.stats.padded_rows == 0  # 2 images x 2 CFG halves: bucket 4


@pytest.mark.parametrize("mode", MODES)
def test_an_image_under_the_units_does_not_depend_on_batch_mates_or_pads(deep, mode):
    """A row alone (1-2 row buckets, fine length buckets) equals the row joining a busy
    batch of other modes mid-way, in one 32-row bucket whose known tokens are padded to all
    256: pad rows (their cache writes go to the scratch row) and pad tokens reach no row."""
    alone_units = transformer_units(deep, "static", buckets=(1, 2), lengths=range(8, 257, 8))
    few = StepEngine(deep, 1, units=alone_units)
    alone = few.admit(5, GUIDED, PRESETS[mode], rng(deep, 2))
    drive(few, [alone], lambda: alone.finished)
    padded = transformer_units(deep, "static", buckets=(32,), lengths=(256,))
    many = StepEngine(deep, 4, units=padded)
    mates = [many.admit(c, p, PRESETS[m], rng(deep, s)) for c, s, p, m in MATES]
    drive(many, mates, lambda: mates[0].done == 3)
    ours = many.admit(5, GUIDED, PRESETS[mode], rng(deep, 2))
    drive(many, [*mates, ours], lambda: ours.finished)
    assert padded.full.stats.hits > 0
    assert padded.full.stats.padded_rows > alone_units.full.stats.padded_rows
    if mode != "mar":  # MARché's lazy passes too: 32 rows, all 256 known tokens
        assert padded.lazy.stats.hits > 0 and padded.lazy.stats.misses == 0
        assert padded.lazy.stats.padded_rows > alone_units.lazy.stats.padded_rows
    assert_same_image(many.tokens([ours]), few.tokens([alone]))


def test_passes_no_unit_holds_run_eager_and_are_counted(deep):
    units = transformer_units(deep, "static", buckets=(1, 2))  # a guided pair: 4 calls
    assert_same_image(run(deep, "mar", units), run(deep, "mar", None))
    assert (units.full.stats.hits, units.full.stats.misses) == (0, GUIDED.num_iter)


def test_cuda_graphs_need_cuda_and_static_builds_every_plain_unit(deep):
    with pytest.raises(ValueError, match="CUDA"):
        FullUnits(deep, "cuda-graphs")
    units = build_full(deep, "static", "1,2")
    assert units is not None and units.stats.built == 2 * len(units.lengths)


@pytest.mark.slow
def test_compiled_units_agree_with_eager_in_fp32_and_bf16(deep):
    """Inductor's encoder and decoder for one (rows, length) unit: exact MAR's tokens within
    1e-5 of their scale in fp32 (fused kernels round differently); under bf16 autocast (8-bit
    mantissa) within 2e-2 of eager's bf16 tokens."""
    units = transformer_units(deep, "compile", buckets=(4, 8), lengths=(256,))
    full = units.full
    full.warm(buckets=(4,))  # bucket 8 is left unbuilt
    assert_same_image(run(deep, "mar", units), run(deep, "mar", None))
    assert (full.stats.built, full.stats.hits, full.stats.misses) == (1, GUIDED.num_iter, 0)
    run(deep, "mar", units, classes=(3, 5, 7), seeds=(1, 2, 3))  # 6 calls: bucket 8 ...
    assert (full.stats.built, full.stats.misses) == (1, GUIDED.num_iter)  # ... never compiled
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = transformer_units(deep, "compile", buckets=(4,), lengths=(256,))
        bf16.full.warm()
        eager, compiled = run(deep, "mar", None), run(deep, "mar", bf16)
    error = (compiled - eager).abs().max() / eager.abs().max()
    print(f"bf16: max relative error {error.item():.2e}")
    assert error < 2e-2


def test_auto_measures_eager_against_a_unit_without_counting_hits(deep):
    """What "auto" runs on CUDA before keeping the units, exercised on any device."""
    units = FullUnits(deep, "static", buckets=(1,))
    eager_s, unit_s = measure_full(units)
    assert eager_s > 0 and unit_s > 0
    assert (units.stats.hits, units.stats.misses, units.stats.built) == (0, 0, 1)


def test_units_bound_to_a_pool_go_with_it(deep):
    """Refill and lazy units write into their step engine's pool; once the engine is gone,
    so are its units (the batch sampler makes a pool per batch: nothing may pile up)."""
    import gc

    units = transformer_units(deep, "static")

    def one_image() -> None:  # its engine and pool live in this call only
        engine = StepEngine(deep, 1, units=units)
        row = engine.admit(5, GUIDED, PRESETS["marche"], rng(deep, 2))
        drive(engine, [row], lambda: row.finished)
        assert units.full.bound_pools == units.lazy.bound_pools == 1
        assert units.full.stats.hits > 0 and units.lazy.stats.hits > 0

    one_image()
    gc.collect()
    assert units.full.bound_pools == units.lazy.bound_pools == 0
