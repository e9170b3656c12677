"""The step engine: rows at different steps, with different plans, cfg, classes and modes,
share steps; an image is the same whether it runs alone or joins a busy batch mid-way."""

from __future__ import annotations

import pytest
import torch

from engine.decode.policy import MODES, PRESETS, make_policy
from engine.decode.pool import PoolFull
from engine.decode.randomness import SeededRandomness
from engine.decode.step import StepEngine
from engine.model.config import SamplingParams
from tests.engine.conftest import run

GUIDED = SamplingParams(num_iter=8, cfg=3.0)
MATES = [  # (class, seed, params, mode): other steps counts, cfg, schedules and modes
    (1, 7, SamplingParams(12, cfg=1.5, cfg_schedule="constant"), "turbo"),
    (9, 3, SamplingParams(16, cfg=1.0), "marche"),
    (4, 5, SamplingParams(6, cfg=4.0, temperature=0.9), "mar"),
]


def rng(model, seed: int) -> SeededRandomness:
    return SeededRandomness(seed, model.config.seq_len, model.config.token_embed_dim, 100, "cpu")


def assert_same_image(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to fp32 rounding: GEMMs over a different set of rows round differently in the
    last bits, and 8 steps of the head carry that on; a batch-dependent computation would
    differ by O(1). Bound: 1e-5 of the tokens' scale."""
    error = (actual - expected).abs().max().item()
    print(f"max |diff| {error:.2e}, scale {expected.abs().max().item():.2f}")
    assert error <= 1e-5 * expected.abs().max().item()


def drive(engine: StepEngine, rows: list, until) -> None:
    """Step every unfinished row until `until()`; finished rows leave (their slots free)."""
    while not until():
        running = [r for r in rows if not r.finished]
        engine.step(running)
        for r in running:
            if r.finished:
                engine.release(r)


@pytest.mark.parametrize("mode", MODES)
def test_a_row_joining_a_busy_batch_mid_way_equals_the_row_alone(deep, mode):
    alone = run(deep, make_policy(mode), GUIDED, classes=(5,), seeds=(2,))
    engine = StepEngine(deep, capacity=4)
    mates = [engine.admit(c, p, PRESETS[m], rng(deep, s)) for c, s, p, m in MATES]
    drive(engine, mates, lambda: mates[0].done == 3)  # mates at steps 3 of 12, 16 and 6
    ours = engine.admit(5, GUIDED, PRESETS[mode], rng(deep, 2))
    rows = [*mates, ours]
    drive(engine, rows, lambda: ours.done == 3)
    late = engine.admit(2, SamplingParams(10, cfg=2.0), PRESETS["turbo"], rng(deep, 11))
    rows.append(late)  # joins in the slot the finished 6-step mate left
    drive(engine, rows, lambda: ours.finished)
    assert mates[2].finished and late.slot == mates[2].slot
    assert_same_image(engine.tokens([ours]), alone)


def test_rows_at_different_steps_share_one_transformer_pass(deep, monkeypatch):
    import engine.decode.step as step_module

    passes = []
    real = step_module.full_pass
    monkeypatch.setattr(
        step_module,
        "full_pass",
        lambda m, p, calls, *rest: passes.append(len(calls)) or real(m, p, calls, *rest),
    )
    engine = StepEngine(deep, capacity=3)
    first = engine.admit(1, GUIDED, PRESETS["mar"], rng(deep, 1))
    engine.step([first])
    second = engine.admit(2, SamplingParams(4, cfg=1.0), PRESETS["mar"], rng(deep, 2))
    engine.step([first, second])  # steps 1 and 0: one pass of 2 + 1 rows
    assert passes == [2, 3]


def test_mixed_modes_match_each_mode_alone(deep):
    """One batch, one row per mode, every row at its own step: each equals its mode alone."""
    engine = StepEngine(deep, capacity=len(MODES))
    rows = []
    for i, mode in enumerate(MODES):
        rows.append(engine.admit(3 + i, GUIDED, PRESETS[mode], rng(deep, i)))
        engine.step(rows)  # the next one joins a step later
    drive(engine, rows, lambda: all(r.finished for r in rows))
    for i, (mode, row) in enumerate(zip(MODES, rows, strict=True)):
        alone = run(deep, make_policy(mode), GUIDED, classes=(3 + i,), seeds=(i,))
        assert_same_image(engine.tokens([row]), alone)


def test_the_pool_is_bounded_and_slots_are_reused(deep):
    engine = StepEngine(deep, capacity=2)
    a = engine.admit(1, GUIDED, PRESETS["marche"], rng(deep, 1))
    b = engine.admit(2, GUIDED, PRESETS["marche"], rng(deep, 2))
    with pytest.raises(PoolFull):
        engine.admit(3, GUIDED, PRESETS["marche"], rng(deep, 3))
    engine.step([a, b])
    buffers = {name: buf.data_ptr() for name, buf in engine.pool.buffers.items()}
    engine.release(a)
    c = engine.admit(3, GUIDED, PRESETS["marche"], rng(deep, 3))
    assert c.slot == a.slot and engine.free_slots == 0
    engine.step([b, c])
    # allocated once: the same buffers, no new ones
    assert {name: buf.data_ptr() for name, buf in engine.pool.buffers.items()} == buffers
