"""Train the shipped digits MAR on CPU (reproducible: one seed drives everything).

    python -m engine.train.train_digits --out engine/weights/digits.safetensors

The training objective is upstream MAR's (`MAR.forward`): random generation orders, a mask
ratio drawn from a truncated normal on [0.7, 1] (or, with `--mask-schedule cosine`, from the
ratios that sampling visits), 10% label dropout to the null class for CFG, and the DiffLoss
diffusion loss (eps MSE + VB, 1000-step cosine) on the masked tokens, repeated
`diffusion_batch_mul` times with fresh timesteps. The EMA weights are saved. `make
train-digits` runs the three stages of the shipped weights.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy import stats

from engine.model.config import MAR_DIGITS, MARConfig
from engine.model.diffusion import NUM_TRAIN_TIMESTEPS, DiffusionSchedule, training_loss
from engine.model.mar import MAR, gather_tokens
from engine.model.tokenizer import patchify
from engine.train.digits import load_digits_split

log = logging.getLogger("train_digits")


def augment(images: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translations by up to `max_shift` pixels (background is -1)."""
    b = len(images)
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    size = images.shape[-1]
    return torch.stack([padded[i, :, dy[i] : dy[i] + size, dx[i] : dx[i] + size] for i in range(b)])


def mar_loss(
    model: MAR,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    gen: torch.Generator,
    sched: DiffusionSchedule,
    mask_ratio: float,
    label_drop_prob: float = 0.1,
    diffusion_batch_mul: int = 4,
) -> torch.Tensor:
    """Upstream `MAR.forward` loss for one batch of tokens (B, L, C)."""
    bsz, seq_len, _ = tokens.shape
    orders = torch.stack([torch.randperm(seq_len, generator=gen) for _ in range(bsz)])
    num_masked = max(1, int(math.ceil(seq_len * mask_ratio)))
    known_idx, masked_idx = orders[:, num_masked:], orders[:, :num_masked]

    drop = torch.rand(bsz, generator=gen) < label_drop_prob
    class_embedding = torch.where(
        drop[:, None], model.fake_latent.expand(bsz, -1), model.class_emb(labels)
    )
    enc = model.forward_encoder(tokens, known_idx, class_embedding)
    z = gather_tokens(model.forward_decoder(enc, known_idx), masked_idx)  # (B, m, D)
    target = gather_tokens(tokens, masked_idx)  # (B, m, C)

    z = z.reshape(-1, z.shape[-1]).repeat(diffusion_batch_mul, 1)
    target = target.reshape(-1, target.shape[-1]).repeat(diffusion_batch_mul, 1)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(target),), generator=gen)
    return training_loss(model.diffloss.net, sched, target, t, z).mean()


MASK_SCHEDULES = ("truncnorm", "cosine")


def sample_mask_ratios(schedule: str, n: int, seed: int) -> np.ndarray:
    """One mask ratio per training step.

    truncnorm: upstream's, mean 1.0 and std 0.25 truncated to [0.7, 1.0]. The model then never
    sees an image more than 30% known, although sampling generates 70% of the tokens from more
    context than that. cosine: cos(pi/2 * u) for uniform u, the ratios that the cosine mask
    schedule visits when sampling (MaskGIT's training distribution), so late steps are trained.
    """
    rng = np.random.RandomState(seed)
    if schedule == "truncnorm":
        return stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25).rvs(n, random_state=rng)
    if schedule == "cosine":
        return np.cos(0.5 * np.pi * rng.uniform(size=n))
    raise ValueError(f"mask schedule must be one of {MASK_SCHEDULES}, got {schedule!r}")


def _short_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def train(
    config: MARConfig,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    ema_rate: float,
    diffusion_batch_mul: int,
    out: Path,
    init: Path | None = None,
    max_shift: int = 1,
    mask_schedule: str = "truncnorm",
) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_digits_split()
    model = MAR(config).train()
    if init is not None:  # a later stage starts from an earlier stage's EMA weights
        model.load_state_dict(load_file(str(init)))
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    sched = DiffusionSchedule.create("")
    mask_ratios = sample_mask_ratios(mask_schedule, steps, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
    warmup = max(1, min(500, steps // 10))
    n = len(data.train_images)
    started = time.time()
    for step in range(steps):
        # linear warmup, then cosine decay to 10% of the peak
        progress = max(0.0, (step - warmup) / max(1, steps - warmup))
        scale = min(1.0, (step + 1) / warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        )
        for group in opt.param_groups:
            group["lr"] = lr * scale
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        images = data.train_images[idx]
        if max_shift > 0:
            images = augment(images, gen, max_shift)
        loss = mar_loss(
            model,
            patchify(images, config.patch_size),
            data.train_labels[idx],
            gen,
            sched,
            float(mask_ratios[step]),
            diffusion_batch_mul=diffusion_batch_mul,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        with torch.no_grad():
            rate = min(ema_rate, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - rate)
        if step % 100 == 0 or step == steps - 1:
            log.info(
                "step %d/%d loss %.4f lr %.2e %.0fs",
                step,
                steps,
                loss.item(),
                lr * scale,
                time.time() - started,
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": config.name,
        "steps": str(steps),
        "batch_size": str(batch_size),
        "lr": str(lr),
        "seed": str(seed),
        "ema_rate": str(ema_rate),
        "diffusion_batch_mul": str(diffusion_batch_mul),
        "max_shift": str(max_shift),
        "mask_schedule": mask_schedule,
        "init": "" if init is None else f"{init.name} ({_short_hash(init)})",
        "train_seconds": f"{time.time() - started:.0f}",
    }
    state = {k: v.contiguous() for k, v in ema.state_dict().items()}
    save_file(state, str(out), metadata={"info": json.dumps(meta)})
    log.info("saved EMA weights to %s (%s)", out, meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("engine/weights/digits.safetensors"))
    parser.add_argument("--steps", type=int, default=3600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema-rate", type=float, default=0.999)
    parser.add_argument("--diffusion-batch-mul", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-shift", type=int, default=1, help="augmentation: shift up to N px")
    parser.add_argument(
        "--mask-schedule", choices=MASK_SCHEDULES, default="truncnorm", help="mask ratio per step"
    )
    parser.add_argument("--init", type=Path, help="start from these weights (a later stage)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    train(
        MAR_DIGITS,
        args.steps,
        args.batch_size,
        args.lr,
        args.seed,
        args.ema_rate,
        args.diffusion_batch_mul,
        args.out,
        args.init,
        args.max_shift,
        args.mask_schedule,
    )


if __name__ == "__main__":
    main()
