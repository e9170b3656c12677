"""The ablation runner: MAR first, every variant on the same seeds, PSNR against MAR."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.decode.marche import MarcheConfig
from engine.decode.policy import DecodeConfig
from engine.eval.ablations import ABLATIONS, run_ablations, turbo_ablations
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
