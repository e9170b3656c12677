"""The MAR sampling loop (upstream `MAR.sample_tokens`), top to bottom in one function.

Differences from upstream, none of which change the maths:
* randomness comes from a `Randomness` object (per-request generators, or a replayed trace);
* positions are index tensors cut from each row's order, never masks + `.nonzero()`;
* only the conditional diffusion trajectory is carried (upstream discards the other half);
* steps that predict zero tokens are skipped (upstream crashes on them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.decode.policy import DecodePolicy, FullRecompute
from engine.decode.profiling import NULL_TIMER, NullTimer, PhaseTimer
from engine.decode.randomness import Randomness
from engine.decode.schedules import cfg_scale, step_plan
from engine.model.config import SamplingParams
from engine.model.mar import MAR


@dataclass(frozen=True)
class StepInfo:
    """What a progress callback sees after each step."""

    step: int
    num_iter: int
    tokens_done: int
    seq_len: int
    tokens: Tensor  # (B, L, C) current tokens (unknown positions are zero)


def _per_row(values: Sequence[float], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # (B, 1)


@torch.no_grad()
def sample_tokens(
    model: MAR,
    labels: Tensor,
    params: Sequence[SamplingParams],
    randomness: Randomness,
    policy: DecodePolicy | None = None,
    on_step: Callable[[StepInfo], Sequence[bool] | None] | None = None,
    timer: PhaseTimer | NullTimer = NULL_TIMER,
) -> Tensor:
    """Generate tokens (B, L, C) for class labels (B,), one SamplingParams per row.

    Rows share `num_iter`; cfg, cfg_schedule and temperature may differ per row. The batch
    is doubled with the null class if any row is guided (cfg != 1).

    `on_step` may return a keep-mask over the current rows (host booleans, e.g. requests whose
    client went away): dropped rows leave the batch before the next step and are absent from
    the result, which then holds the surviving rows in order. Survivors are unaffected: every
    row owns its randomness and its slice of the policy's caches.
    """
    policy = policy or FullRecompute()
    cfg = model.cfg
    bsz, seq_len, device = len(labels), cfg.seq_len, labels.device
    num_iter = params[0].num_iter
    if any(p.num_iter != num_iter for p in params):
        raise ValueError("rows batched together must share num_iter")
    plan = step_plan(num_iter, seq_len)
    guided = any(p.cfg != 1.0 for p in params)
    # per-row, per-step guidance scales and temperatures, computed on the host up front
    cfg_table = torch.tensor(
        [[cfg_scale(p.cfg, p.cfg_schedule, s.mask_len, seq_len) for p in params] for s in plan],
        dtype=torch.float32,
        device=device,
    )  # (num_iter, B)
    temperature = _per_row([p.temperature for p in params], device)

    orders = randomness.orders().to(device)  # (B, L)
    tokens = torch.zeros(bsz, seq_len, cfg.token_embed_dim, device=device)
    class_embedding = model.class_embedding(labels, guided)  # (B', D)
    policy.begin(model, bsz, num_iter)

    for s in plan:
        if s.num_pred == 0:
            continue
        # positions generated so far, oldest first: (B, L - unknown)
        known_idx = orders[:, s.unknown_before :].flip(1)
        pred_idx = orders[:, s.unknown_before - s.num_pred : s.unknown_before]  # (B, k)
        x = torch.cat([tokens, tokens]) if guided else tokens
        idx = torch.cat([known_idx, known_idx]) if guided else known_idx
        pidx = torch.cat([pred_idx, pred_idx]) if guided else pred_idx
        with timer.phase("encoder"):
            enc = policy.encode(model, s.index, x, idx, class_embedding)  # (B', buf + n, D)
        with timer.phase("decoder"):
            h = policy.decode(model, s.index, enc, idx, pidx)  # (B', k, D) before the norm
            z = model.decoder_output_at(h, pidx)  # (B', k, D)

        k = s.num_pred
        x_T, step_noise = randomness.noise(s.index, pred_idx)  # (B, k, C), (T, B, k, C)
        row_cfg = cfg_table[s.index][:, None].repeat_interleave(k, dim=0)  # (B*k, 1)
        with timer.phase("diffusion_head"):
            sampled = policy.head.sample(
                model.diffloss,
                s.index,
                num_iter,
                z.reshape(-1, z.shape[-1]),  # (B'*k, D)
                x_T.reshape(bsz * k, -1).float(),
                step_noise.reshape(step_noise.shape[0], bsz * k, -1).float(),
                temperature.repeat_interleave(k, dim=0),
                row_cfg if guided else None,
            )  # (B*k, C)
        tokens.scatter_(
            1,
            pred_idx[..., None].expand(-1, -1, tokens.shape[-1]),
            sampled.view(bsz, k, -1).to(tokens.dtype),
        )
        keep = None
        if on_step is not None:
            info = StepInfo(s.index, num_iter, seq_len - s.unknown_before + k, seq_len, tokens)
            keep = on_step(info)
        if keep is not None and not all(keep):  # retire rows between steps
            rows = torch.tensor([i for i, kept in enumerate(keep) if kept], device=device)
            rows2 = torch.cat([rows, rows + bsz]) if guided else rows  # both CFG halves
            bsz = len(rows)
            if bsz == 0:
                break
            tokens, orders, temperature = tokens[rows], orders[rows], temperature[rows]
            cfg_table, class_embedding = cfg_table[:, rows], class_embedding[rows2]
            randomness.select(rows)
            policy.select(rows2)
    return tokens[:bsz]
