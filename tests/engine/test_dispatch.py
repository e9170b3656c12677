"""`marche bench --dispatch`: operator calls per AR step and phase, device-independent."""

from __future__ import annotations

import torch

from engine.eval.dispatch import OpCounter, count_run, dispatch_table
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline

PARAMS = SamplingParams(num_iter=4, cfg=3.0)


def test_the_counter_attributes_calls_to_phases_and_sets_views_apart():
    counter = OpCounter()
    x = torch.ones(4, 4)
    with counter:
        with counter.phase("encoder"):
            y = x @ x  # one kernel
            y.t()  # a view: no kernel
        with counter.phase("vae"):
            (y + 1).sum()  # two kernels
            y[0, 0].item()  # two selects (views), then a host sync
    assert counter.ops["encoder"] == 1 and counter.free["encoder"] == 1
    assert counter.ops["vae"] == 3 and counter.syncs["vae"] == 1  # add, sum, _local_scalar_dense
    assert counter.free["vae"] == 2


def test_counts_are_deterministic_after_the_first_run():
    pipe = Pipeline.load("digits", device="cpu", dtype="fp32")
    count_run(pipe, "marche", 2, PARAMS, None)  # builds what later runs reuse
    first = count_run(pipe, "marche", 2, PARAMS, None)
    again = count_run(pipe, "marche", 2, PARAMS, None)
    assert first.ops == again.ops and first.free == again.free
    assert all(first.ops[p] > 0 for p in ("encoder", "decoder", "diffusion_head", "vae"))
    assert first.ops["diffusion_head"] > first.ops["encoder"] + first.ops["decoder"]


def test_the_table_reports_per_step_counts_and_turbo_cuts_the_head():
    report = dispatch_table("digits", ["mar", "turbo"], [1, 4], PARAMS)
    rows = {(r["mode"], r["batch"]): r for r in report["rows"]}
    assert report["steps"] == 4
    assert set(rows) == {("mar", 1), ("turbo", 1), ("mar", 4), ("turbo", 4)}
    for r in rows.values():
        assert r["ops_per_step"] == round(sum(r["phases_per_step"].values()), 1)
        assert r["syncs_per_step"] == 0  # no host sync in a decoding step
    # turbo's head runs 50 -> 10 denoising steps instead of 50: far fewer calls per AR step
    assert rows["turbo", 1]["phases_per_step"]["diffusion_head"] < (
        0.75 * rows["mar", 1]["phases_per_step"]["diffusion_head"]
    )


def test_counting_the_first_steps_of_a_run():
    """A few steps of the real schedule (not a shorter run, whose steps are heavier)."""
    full = dispatch_table("digits", ["marche"], [1], PARAMS)
    first = dispatch_table("digits", ["marche"], [1], PARAMS, count_steps=2)
    assert first["counted_steps"] == 2 and full["counted_steps"] == 4
    assert 0 < first["rows"][0]["ops_per_step"]
    assert first["rows"][0]["phases_per_step"]["encoder"] > 0
