"""The digits training script: reproducible from its seed, and a later stage starts from an
earlier one's weights."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.config import MAR_DIGITS
from engine.model import MAR
from engine.train_digits import train


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
