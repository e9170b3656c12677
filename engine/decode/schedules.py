"""Pure schedule functions of MAR's sampling loop (official `sample_tokens`, §3 of our notes).

Plain ints and floats in, plain ints and floats out, so the off-by-one cases that break parity
with upstream are pinned down by table tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def mask_len(step: int, num_iter: int, seq_len: int, unknown_before: int) -> int:
    """Tokens left unknown after `step`: the cosine schedule with upstream's clamp.

    The clamp keeps at least one token masked for the next step and (nominally) predicts at
    least one now: max(1, min(unknown_before - 1, floor(L * cos(pi/2 * (s+1)/N)))).
    """
    mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
    target = int(np.floor(seq_len * mask_ratio))
    return max(1, min(unknown_before - 1, target))


@dataclass(frozen=True)
class Step:
    """One autoregressive step: tokens `orders[:, mask_len:unknown_before]` are predicted."""

    index: int
    unknown_before: int  # tokens still unknown when the step starts
    mask_len: int  # clamped mask_len as upstream computes it (drives linear CFG)
    num_pred: int  # tokens predicted this step, per image (may be 0 for short sequences)
    stage: int = 0  # GtR's two-stage order: 0 structure (or a one-stage run), 1 reconstruction


def step_plan(num_iter: int, seq_len: int) -> list[Step]:
    """Every step of a run: how many tokens each predicts. The last step predicts the rest.

    Upstream crashes on steps that predict zero tokens (e.g. 64 tokens in 256 steps); here such
    steps simply have `num_pred == 0` and the sampler skips them.
    """
    steps = []
    unknown = seq_len
    for s in range(num_iter):
        m = mask_len(s, num_iter, seq_len, unknown)
        num_pred = unknown if s == num_iter - 1 else unknown - m
        steps.append(Step(index=s, unknown_before=unknown, mask_len=m, num_pred=num_pred))
        unknown -= num_pred
    return steps


def cfg_scale(cfg: float, schedule: str, mask_len: int, seq_len: int) -> float:
    """Guidance scale of one step. `linear` uses the same step's clamped mask_len.

    linear: 1 + (cfg - 1) * (L - mask_len) / L, in float32 as upstream computes it.
    """
    if schedule == "constant":
        return float(cfg)
    if schedule == "linear":
        remaining = np.float32(seq_len) - np.float32(mask_len)
        return float(np.float32(1.0) + np.float32(cfg - 1.0) * remaining / np.float32(seq_len))
    raise ValueError(f"unknown cfg_schedule {schedule!r}")
