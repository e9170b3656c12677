"""Shared fixtures: the golden data of the official MAR code lives in ../shared/reference/mar."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def reference_dir() -> Path:
    env = os.environ.get("MARCHE_REFERENCE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "mar"


@pytest.fixture(scope="session")
def ref() -> Path:
    path = reference_dir()
    if not path.is_dir():
        pytest.skip(f"golden reference data not found at {path}")
    return path


@pytest.fixture(scope="session")
def load_golden(ref: Path):
    def load(name: str) -> dict[str, torch.Tensor]:
        return load_file(str(ref / name))

    return load


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
