"""The digits training script: reproducible from its seed, and a later stage starts from an
earlier one's weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.model.config import MAR_DIGITS
from engine.model.mar import MAR
from engine.train.train_digits import sample_mask_ratios, train


def _train(out, **kwargs):
    args = {"steps": 2, "batch_size": 4, "lr": 1e-3, "seed": 0, "ema_rate": 0.999}
    train(MAR_DIGITS, diffusion_batch_mul=1, out=out, **{**args, **kwargs})
    return load_file(str(out))


def test_training_is_seeded_and_writes_loadable_weights(tmp_path):
    first = _train(tmp_path / "a.safetensors")
    again = _train(tmp_path / "b.safetensors")
    other = _train(tmp_path / "c.safetensors", seed=1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    MAR(MAR_DIGITS).load_state_dict(first, strict=True)


def test_a_later_stage_starts_from_the_given_weights(tmp_path):
    stage1 = tmp_path / "stage1.safetensors"
    _train(stage1, seed=1)
    stage2 = _train(tmp_path / "stage2.safetensors", init=stage1, max_shift=0, lr=1e-9)
    scratch = _train(tmp_path / "scratch.safetensors", max_shift=0, lr=1e-9)
    start = load_file(str(stage1))
    # with a vanishing learning rate the weights stay where they started
    assert all(torch.allclose(stage2[k], start[k], atol=1e-6) for k in start)
    assert not all(torch.allclose(scratch[k], start[k], atol=1e-6) for k in start)
    with safe_open(str(tmp_path / "stage2.safetensors"), "pt") as f:
        info = json.loads(f.metadata()["info"])
    assert info["init"].startswith("stage1.safetensors") and info["max_shift"] == "0"


@pytest.mark.parametrize(
    "schedule, low, high, mean",
    [
        ("truncnorm", 0.7, 1.0, 0.867),  # upstream: never below 70% masked
        ("cosine", 0.0, 1.0, 2 / np.pi),  # E[cos(pi u / 2)] = 2 / pi: late steps trained too
    ],
)
def test_mask_ratio_schedules(schedule, low, high, mean):
    ratios = sample_mask_ratios(schedule, 20_000, seed=0)
    assert np.array_equal(ratios, sample_mask_ratios(schedule, 20_000, seed=0))
    assert low <= ratios.min() and ratios.max() <= high
    assert ratios.mean() == pytest.approx(mean, abs=0.01)
    if schedule == "cosine":
        assert (ratios < 0.3).mean() > 0.15  # ~19% of steps see an image over 70% known


def test_unknown_mask_schedule_is_refused():
    with pytest.raises(ValueError, match="mask schedule"):
        sample_mask_ratios("uniform", 4, seed=0)


def test_cosine_training_runs_and_records_its_schedule(tmp_path):
    _train(tmp_path / "cos.safetensors", mask_schedule="cosine", steps=3)
    with safe_open(str(tmp_path / "cos.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["info"])["mask_schedule"] == "cosine"
