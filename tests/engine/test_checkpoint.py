"""Loading official-format checkpoints strictly, and failing clearly on wrong files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.model.checkpoint import CheckpointError, read_state_dict
from engine.model.config import MAR_TINY
from engine.pipeline import load_mar


@pytest.fixture(scope="module")
def weights(ref) -> dict[str, torch.Tensor]:
    return load_file(str(ref / "tiny_weights_perturbed.safetensors"))


def assert_loaded(model, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_official_pth_prefers_ema_weights(tmp_path, weights):
    other = {k: v + 1 for k, v in weights.items()}
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": other, "model_ema": weights}, path)  # as main_mar.py writes it
    model = load_mar(MAR_TINY, path)
    assert_loaded(model, weights)
    assert not model.training


def test_pth_without_ema_falls_back_to_model(tmp_path, weights):
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": weights, "epoch": 3}, path)
    assert_loaded(load_mar(MAR_TINY, path), weights)


def test_flat_safetensors_load(ref, weights):
    assert_loaded(load_mar(MAR_TINY, ref / "tiny_weights_perturbed.safetensors"), weights)


def test_missing_key_is_named(tmp_path, weights):
    truncated = {k: v for k, v in weights.items() if k != "decoder_norm.bias"}
    path = tmp_path / "truncated.safetensors"
    save_file(truncated, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys: decoder_norm\.bias"):
        load_mar(MAR_TINY, path)


def test_unexpected_key_and_wrong_shape_are_named(tmp_path, weights):
    extra = dict(weights, **{"head.weight": torch.zeros(2)})
    extra["mask_token"] = torch.zeros(1, 1, 32)
    path = tmp_path / "extra.pth"
    torch.save({"model_ema": extra}, path)
    with pytest.raises(CheckpointError) as err:
        load_mar(MAR_TINY, path)
    assert "unexpected keys: head.weight" in str(err.value)
    assert "mask_token (1, 1, 32) != (1, 1, 64)" in str(err.value)


def test_wrong_model_size_fails_loudly(ref):
    from engine.model.config import MAR_DIGITS

    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_mar(MAR_DIGITS, ref / "tiny_weights_perturbed.safetensors")


@pytest.mark.parametrize("name", ["missing.pth", "garbage.safetensors", "garbage.pth"])
def test_unreadable_files(tmp_path, name):
    path = tmp_path / name
    if name.startswith("garbage"):
        path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not found|not a readable"):
        read_state_dict(path)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": object()}, path)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_state_dict(path)  # weights_only=True refuses arbitrary objects
