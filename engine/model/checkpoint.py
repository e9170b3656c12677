"""Reading weight files safely and loading them strictly.

Official MAR checkpoints are `checkpoint-last.pth` pickles holding `{"model", "model_ema"}`;
the KL-16 VAE is `kl16.ckpt` holding `{"model"}`; converted weights are flat safetensors.
Pickles go through `torch.load(weights_only=True)`, so no code in a file ever runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn


class CheckpointError(ValueError):
    """A weight file is missing, unreadable, or does not fit the model."""


def read_state_dict(
    path: str | Path, prefer: Sequence[str] = ("model_ema", "model")
) -> dict[str, torch.Tensor]:
    """Read a flat state dict from safetensors or a (weights-only) torch pickle.

    For pickles holding several state dicts, the first key of `prefer` present wins
    (EMA weights first, as the official evaluation uses them).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    for key in prefer:
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key])
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise CheckpointError(
        f"{path}: no state dict under any of {list(prefer)} (top-level keys: {sorted(obj)[:8]})"
    )


def _summarise(keys: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """`load_state_dict(strict=True)` with an error that names what is wrong in one line."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {_summarise(wrong_shape)}")
    if problems:
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)
