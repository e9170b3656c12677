"""The MAR sampling loop (upstream `MAR.sample_tokens`) for one batch: a thin loop over the
step engine (`step.py`), every row at the same step.

Differences from upstream, none of which change the maths:
* randomness comes from one `RowRandomness` per image (its own generator, or a replayed trace);
* positions are index tensors cut from each row's order, never masks + `.nonzero()`;
* only the conditional diffusion trajectory is carried (upstream discards the other half);
* steps that predict zero tokens are skipped (upstream crashes on them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.decode.policy import DecodePolicy, make_policy
from engine.decode.profiling import NULL_TIMER, NullTimer, PhaseTimer
from engine.decode.randomness import RowRandomness
from engine.decode.step import StepEngine
from engine.decode.units.common import DecodeUnits
from engine.model.config import SamplingParams
from engine.model.mar import MAR


@dataclass(frozen=True)
class StepInfo:
    """What a progress callback sees after each step."""

    step: int
    num_steps: int  # steps of the run: num_iter, or fewer under GtR (S + K)
    tokens_done: int
    seq_len: int
    tokens: Tensor  # (B, L, C) current tokens (unknown positions are zero)


@torch.no_grad()
def sample_tokens(
    model: MAR,
    labels: Tensor,
    params: Sequence[SamplingParams],
    randomness: Sequence[RowRandomness],
    policy: DecodePolicy | None = None,
    on_step: Callable[[StepInfo], Sequence[bool] | None] | None = None,
    timer: PhaseTimer | NullTimer = NULL_TIMER,
    units: DecodeUnits | None = None,
) -> Tensor:
    """Generate tokens (B, L, C) for class labels (B,), one SamplingParams and one
    randomness per row.

    Rows share `num_iter`; cfg, cfg_schedule and temperature may differ per row (a row is
    guided when its cfg != 1). `units`: the phases that run as units (see `StepEngine`).

    `on_step` may return a keep-mask over the current rows (host booleans, e.g. requests whose
    client went away): dropped rows leave the batch before the next step and are absent from
    the result, which then holds the surviving rows in order. Survivors are unaffected: every
    row owns its randomness and its slot of the caches.
    """
    policy = policy or make_policy("mar")
    num_iter = params[0].num_iter
    if any(p.num_iter != num_iter for p in params):
        raise ValueError("rows batched together must share num_iter")
    engine = StepEngine(model, len(labels), units=units)
    rows = [
        engine.admit(labels[i], p, policy.config, r)
        for i, (p, r) in enumerate(zip(params, randomness, strict=True))
    ]
    while rows and not rows[0].finished:
        lazy_before = sum(r.lazy_cond_steps for r in rows)
        engine.step(rows, timer)
        policy.stats.append(sum(r.active[-1] for r in rows) / len(rows))
        policy.lazy_steps += sum(r.lazy_cond_steps for r in rows) > lazy_before
        if on_step is None:
            continue
        step = rows[0].steps[rows[0].done - 1]
        info = StepInfo(
            step.index,
            rows[0].num_steps,
            rows[0].tokens_done,
            model.config.seq_len,
            engine.tokens(rows),
        )
        keep = on_step(info)
        if keep is not None and not all(keep):  # retire rows between steps
            for row, kept in zip(rows, keep, strict=True):
                if not kept:
                    engine.release(row)
            rows = [row for row, kept in zip(rows, keep, strict=True) if kept]
    return engine.tokens(rows)
