"""The head as one unit per (plan, guided, token bucket) (`engine/decode/units/head.py`): padded
rows change no real row, every mode under the units equals eager, an image under the units
does not depend on its batch mates or on how many pad rows its steps had, the compiled loop
agrees with eager in fp32 and under bf16 autocast, and every call the units cannot serve runs
eager and is counted. CUDA-graph capture is tested in test_cuda.py (on a device)."""

from __future__ import annotations

import pytest
import torch

from engine.decode.head import HeadConfig, HeadPlan, HeadPolicy, clipped_schedule
from engine.decode.passes import head as head_pass
from engine.decode.policy import MODES, PRESETS, make_policy
from engine.decode.step import StepEngine
from engine.decode.units.build import build_head, build_units, head_plans, measure_head
from engine.decode.units.common import DecodeUnits, bucket_for, parse_buckets, run_phase
from engine.decode.units.head import HeadUnits, compiled_loop
from engine.model.config import SamplingParams
from tests.engine.conftest import run
from tests.engine.test_step import GUIDED, MATES, assert_same_image, drive, rng


def head_inputs(head, rows: int, guided: bool = True, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    net, steps = head.net, head.gen_schedule.num_timesteps
    width, channels = net.cond_embed.in_features, net.in_channels
    z = torch.randn((2 if guided else 1) * rows, width, generator=g)
    x_T = torch.randn(rows, channels, generator=g)
    noise = torch.randn(steps, rows, channels, generator=g)
    temperature = 0.5 + torch.rand(rows, 1, generator=g)
    cfg = 1 + 3 * torch.rand(rows, 1, generator=g) if guided else None
    return z, x_T, noise, temperature, cfg


def test_buckets_are_parsed_and_rows_go_to_the_next_one():
    assert parse_buckets("8, 1,4,4") == (1, 4, 8)
    assert [bucket_for(n, (1, 4, 8)) for n in (1, 2, 4, 5, 8, 9)] == [1, 4, 4, 8, 8, None]
    with pytest.raises(ValueError, match="positive"):
        parse_buckets("0,4")


@pytest.mark.parametrize(
    "config", [HeadConfig(), HeadConfig(cache_period=3)], ids=["exact", "cache"]
)
@pytest.mark.parametrize("guided", [True, False])
def test_padded_rows_change_no_real_row(deep, config, guided):
    """The same rows alone (eager) and padded into buckets 4 and 16 under two different pad
    contents (fresh zeros, then stale rows of a larger call): equal to fp32 rounding."""
    head = deep.diffloss
    plan = HeadPolicy(config).plan(head, 0, 8)
    units = HeadUnits(head, "static", buckets=(4, 16))
    inputs = head_inputs(head, 3, guided)
    alone = head_pass.sample(head, plan, *inputs)
    for rows in (3, 11):  # 11 rows leave stale data in bucket 16 ...
        other = head_inputs(head, rows, guided, seed=rows)
        assert_same_image(
            run_phase(units, head_pass.sample, head, plan, *other),
            head_pass.sample(head, plan, *other),
        )
    assert_same_image(
        run_phase(units, head_pass.sample, head, plan, *inputs), alone
    )  # ... then 3 rows reuse bucket 4
    stale = HeadUnits(head, "static", buckets=(16,))
    run_phase(stale, head_pass.sample, head, plan, *head_inputs(head, 11, guided, seed=5))
    assert_same_image(
        run_phase(stale, head_pass.sample, head, plan, *inputs), alone
    )  # 13 stale pad rows
    assert units.stats.hits == 3 and units.stats.padded_rows == 1 + 5 + 1


def test_calls_the_units_cannot_serve_run_eager_and_are_counted(deep):
    head = deep.diffloss
    plan = HeadPolicy().plan(head, 0, 8)
    units = HeadUnits(head, "static", buckets=(1, 2))
    inputs = head_inputs(head, 3)  # above the largest bucket
    torch.testing.assert_close(
        run_phase(units, head_pass.sample, head, plan, *inputs),
        head_pass.sample(head, plan, *inputs),
    )
    assert (units.stats.hits, units.stats.misses) == (0, 1)
    cached = HeadPolicy(HeadConfig(cache_period=2)).plan(head, 0, 8)
    compiled = HeadUnits(head, "compile", buckets=(4,))
    compiled.warm([cached])  # the head cache's plans are not compiled ...
    assert compiled.stats.built == 0
    run_phase(
        compiled, head_pass.sample, head, cached, *head_inputs(head, 2)
    )  # ... and never compiled while serving
    assert (compiled.stats.built, compiled.stats.misses) == (0, 1)


def test_cuda_graphs_need_cuda_and_auto_is_eager_off_the_gpu(deep):
    with pytest.raises(ValueError, match="CUDA"):
        HeadUnits(deep.diffloss, "cuda-graphs")
    assert build_units(deep, "auto", PRESETS.values(), "1,4") is None
    assert build_units(deep, "off", PRESETS.values(), "1,4") is None
    with pytest.raises(ValueError, match="units must be one of"):
        build_units(deep, "fast", PRESETS.values(), "1,4")
    configs = [PRESETS[m] for m in ("mar", "marche", "turbo")]  # turbo's head is annealed
    units = build_head(deep.diffloss, "static", "1,4", configs, guided=(True,))
    assert units is not None and units.stats.built == 2  # the native plan (mar's) x 2 buckets


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_under_the_units_equals_eager(deep, mode):
    """Every row's tokens, for a batch of two, whatever the pad rows of each step."""
    eager = run(deep, make_policy(mode), GUIDED)
    units = HeadUnits(deep.diffloss, "static", buckets=(1, 4, 16, 64, 256))
    assert_same_image(run(deep, make_policy(mode), GUIDED, units=DecodeUnits(head=units)), eager)
    assert units.stats.hits > 0 and units.stats.misses == 0


@pytest.mark.parametrize("mode", MODES)
def test_an_image_under_the_units_does_not_depend_on_batch_mates_or_pad_rows(deep, mode):
    """A row joining a busy batch mid-way under buckets (64,) (many pad rows) equals the row
    alone under buckets (1, 2, 4, ...) (few): neither its mates nor its pads reach it."""
    few_units = HeadUnits(deep.diffloss, "static", (1, 2, 4, 8, 16))
    few = StepEngine(deep, 1, units=DecodeUnits(head=few_units))
    alone = few.admit(5, GUIDED, PRESETS[mode], rng(deep, 2))
    drive(few, [alone], lambda: alone.finished)
    many_units = HeadUnits(deep.diffloss, "static", (64,))
    many = StepEngine(deep, 4, units=DecodeUnits(head=many_units))
    mates = [many.admit(c, p, PRESETS[m], rng(deep, s)) for c, s, p, m in MATES]
    drive(many, mates, lambda: mates[0].done == 3)
    ours = many.admit(5, GUIDED, PRESETS[mode], rng(deep, 2))
    drive(many, [*mates, ours], lambda: ours.finished)
    assert many_units.stats.padded_rows > few_units.stats.padded_rows
    assert_same_image(many.tokens([ours]), few.tokens([alone]))


SHORT = HeadPlan(clipped_schedule(10, 950))  # 10 DDPM steps: a quicker compile


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    error = (actual.float() - expected.float()).abs().max() / expected.float().abs().max()
    print(f"max relative error {error.item():.2e}")
    return error.item()


@pytest.mark.slow
def test_the_compiled_loop_agrees_with_eager_in_fp32_and_bf16(deep):
    """Inductor fuses the step's elementwise ops (other rounding): fp32 within 1e-5 of the
    output's scale; under bf16 autocast (8-bit mantissa) within 2e-2 of eager's bf16."""
    head = deep.diffloss
    units = HeadUnits(head, "compile", buckets=(4,))
    units.warm([SHORT], guided=(True,))
    inputs = head_inputs(head, 3)
    assert (
        relative_error(
            run_phase(units, head_pass.sample, head, SHORT, *inputs),
            head_pass.sample(head, SHORT, *inputs),
        )
        < 1e-5
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = head_pass.sample(head, SHORT, *inputs)
        compiled = compiled_loop(head, SHORT, True, tuple(t.clone() for t in inputs))()
    assert relative_error(compiled, eager) < 2e-2
    assert (units.stats.built, units.stats.hits, units.stats.misses) == (1, 1, 0)
    with pytest.raises(ValueError, match="head cache"):
        compiled_loop(head, HeadPlan(SHORT.schedule, frozenset({9})), True, inputs)


def test_the_pipeline_and_its_step_engines_use_the_units(deep):
    from engine.pipeline import Pipeline

    pipe = Pipeline.load("digits", units="static", head_buckets="4,16,64")
    head = pipe.units.head
    plans = head_plans(pipe.model.diffloss, PRESETS.values())  # the constant head schedules
    assert head is not None and head.stats.built == len(plans) * 3 * 2  # buckets x guided
    assert pipe.step_engine(1).units is pipe.units
    tokens = pipe.generate_tokens([3], [1], SamplingParams(num_iter=16, cfg=3.0))
    assert head.stats.hits == 16 and head.stats.misses == 0
    pipe.units = DecodeUnits()  # eager
    assert_same_image(tokens, pipe.generate_tokens([3], [1], SamplingParams(num_iter=16, cfg=3.0)))


def test_auto_measures_eager_against_a_unit_without_counting_hits(deep):
    """What "auto" runs on CUDA before keeping the units, exercised on any device."""
    units = HeadUnits(deep.diffloss, "static", buckets=(2,))
    eager_s, unit_s = measure_head(units, HeadPolicy().plan(deep.diffloss, 0, 8), 2)
    assert eager_s > 0 and unit_s > 0
    assert (units.stats.hits, units.stats.misses, units.stats.built) == (0, 0, 1)
