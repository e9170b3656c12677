"""The ablation runner: MAR first, every variant on the same seeds, PSNR against MAR."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.decode.marche import MarcheConfig
from engine.decode.policy import DecodeConfig
from engine.eval.ablations import (
    ABLATIONS,
    load_reference,
    merge_rows,
    run_ablations,
    turbo_ablations,
)
from engine.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load("digits", device="cpu")


def test_variant_covering_every_token_reproduces_mar_and_a_real_one_does_not(pipe):
    every_token = MarcheConfig(budget=16 + 256, refresh_period=1)
    variants = {
        "every token active": DecodeConfig(marche=every_token),
        "defaults": DecodeConfig(marche=MarcheConfig()),
    }
    params = replace(pipe.spec.defaults, num_iter=6)
    mar, exact, approx = run_ablations(pipe, params, num=10, batch_size=5, variants=variants)
    assert [r["name"] for r in (mar, exact, approx)] == ["MAR (exact)", *variants]
    assert mar["psnr_vs_mar_db"] is None and mar["decoding"] is None
    assert exact["psnr_vs_mar_db"] == 100.0  # identical pixels on every seed
    assert exact["frechet_distance"] == mar["frechet_distance"]
    assert exact["accuracy"] == mar["accuracy"]
    assert approx["psnr_vs_mar_db"] < 100.0  # MARché's defaults do approximate
    assert approx["decoding"]["marche"] == MarcheConfig().__dict__
    assert exact["drift_frechet"] == pytest.approx(0.0, abs=1e-6) and exact["drift_p"] == 1.0
    assert approx["drift_frechet"] > 0.0 and 0.0 < approx["drift_p"] <= 1.0
    assert "drift_p" not in mar
    assert mar["frechet_sd"] is None  # 1 image a class: too few to halve


def test_the_paper_ablations_are_all_there():
    assert ABLATIONS["MARché (defaults)"] == DecodeConfig(marche=MarcheConfig())
    default = MarcheConfig().__dict__
    changed = {name: {k for k, v in c.marche.__dict__.items() if default[k] != v}
               for name, c in ABLATIONS.items()}  # fmt: skip
    assert changed == {
        "MARché (defaults)": set(),
        "no caching tokens": {"caching_tokens"},
        "random refresh": {"refresh"},
        "low-attention refresh": {"refresh"},
        "encoder full recompute": {"encoder"},
    }


def test_the_turbo_set_has_each_knob_alone_and_the_presets():
    variants = turbo_ablations()
    alone = {name: c for name, c in variants.items() if "alone" in name}
    for name, config in alone.items():  # exactly one knob differs from exact MAR
        changed = [f for f in ("marche", "cond_cache") if getattr(config, f) is not None]
        changed += ["head"] if not config.head.exact else []
        assert len(changed) == 1, name
    assert {"marche (preset)", "turbo (preset)"} <= set(variants)


def test_a_saved_mar_reference_is_reused_by_a_later_run_of_the_same_settings(pipe, tmp_path):
    ref = tmp_path / "mar.safetensors"
    params = replace(pipe.spec.defaults, num_iter=4)
    exact = {"every token active": DecodeConfig(marche=MarcheConfig(budget=272, refresh_period=1))}
    (first,) = run_ablations(pipe, params, num=10, batch_size=5, variants={}, reference_path=ref)
    assert ref.exists()
    mar, again = run_ablations(pipe, params, 10, batch_size=5, variants=exact, reference_path=ref)
    assert mar == first  # loaded, timing included, not generated again
    assert again["psnr_vs_mar_db"] == 100.0  # the PSNR reference is the saved images
    other = replace(params, num_iter=3)  # other settings: MAR generated anew, the file replaced
    (fresh,) = run_ablations(pipe, other, num=10, batch_size=5, variants={}, reference_path=ref)
    assert fresh["seconds"] != first["seconds"]
    assert load_reference(ref, {"params": other.__dict__, "num": 10, "seed": 0, "batch_size": 5})


def test_rows_of_four_images_a_class_carry_their_frechet_spread(pipe):
    params = replace(pipe.spec.defaults, num_iter=2)
    (mar,) = run_ablations(pipe, params, num=40, batch_size=20, variants={})
    assert mar["frechet_sd"] > 0.0


def test_merged_rows_keep_order_and_take_the_newer_row():
    old = [{"name": "MAR (exact)", "v": 1}, {"name": "a", "v": 1}]
    new = [{"name": "MAR (exact)", "v": 1}, {"name": "a", "v": 2}, {"name": "b", "v": 1}]
    assert merge_rows(old, new) == [
        {"name": "MAR (exact)", "v": 1}, {"name": "a", "v": 2}, {"name": "b", "v": 1}
    ]  # fmt: skip
