"""Gaussian diffusion for MAR's DiffLoss head: the cosine schedule, respacing, the DDPM
sampling coefficients and the training loss (eps MSE + variational bound, learned-range sigma).

Settings are upstream's `create_diffusion(timestep_respacing, "cosine")`: 1000 base steps,
`ModelMeanType.EPSILON`, `ModelVarType.LEARNED_RANGE`, loss MSE (+VB), no clipping. The schedule
arrays are float64 numpy, as upstream keeps them, and are gathered to float32 for arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000


def cosine_betas(num_steps: int = NUM_TRAIN_TIMESTEPS, max_beta: float = 0.999) -> np.ndarray:
    """betas of the cosine schedule: 1 - abar((i+1)/T) / abar(i/T), capped at max_beta."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return np.array(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str) -> list[int]:
    """Upstream's respacing: which base steps a "100"-style spec keeps (banker's rounding).

    "ddimN" keeps every k-th step from 0 (k chosen so N remain), as upstream's DDIM option.
    """
    if section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot keep exactly {desired} of {num_timesteps} steps with a stride")
    counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        stride = (size - 1) / (count - 1) if count > 1 else 1
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


@dataclass(frozen=True)
class DiffusionSchedule:
    """All float64 arrays of a (possibly respaced) diffusion, indexed by the spaced step."""

    timestep_map: np.ndarray  # spaced index -> original 0..999 timestep the net sees
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    # device -> the sampler's step terms: built once per device, so a decoding step copies
    # nothing from the host (on CUDA a pageable host-to-device copy waits for the stream)
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def log_betas(self) -> np.ndarray:
        return np.log(self.betas)

    @classmethod
    def from_betas(cls, betas: np.ndarray, timestep_map: np.ndarray) -> DiffusionSchedule:
        alphas = 1.0 - betas
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        return cls(
            timestep_map=timestep_map,
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=post_var,
            # the first entry is 0, so upstream clips the log by repeating the second entry
            posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        )

    @classmethod
    def create(cls, respacing: str = "") -> DiffusionSchedule:
        """Upstream `create_diffusion(respacing, "cosine")`; "" keeps all 1000 steps."""
        base = cosine_betas()
        if not respacing:
            return cls.from_betas(base, np.arange(len(base), dtype=np.int64))
        return cls.from_kept(space_timesteps(len(base), respacing))

    @classmethod
    def from_kept(cls, kept: list[int]) -> DiffusionSchedule:
        """The cosine diffusion respaced to the base timesteps `kept` (upstream's rule)."""
        base = cosine_betas()
        use = set(kept)
        last, new_betas, tmap = 1.0, [], []
        for i, ac in enumerate(np.cumprod(1.0 - base, axis=0)):
            if i in use:
                new_betas.append(1 - ac / last)
                last = ac
                tmap.append(i)
        return cls.from_betas(np.array(new_betas), np.array(tmap, dtype=np.int64))

    def step_terms(self, device: torch.device | str) -> StepTerms:
        """The sampler's per-step constants, folded (`StepTerms`), built once per device."""
        key = ("terms", str(torch.device(device)))
        if key not in self._on_device:
            self._on_device[key] = StepTerms(self, torch.device(device))
        return self._on_device[key]


class StepTerms:
    """A DDPM step x_{i-1} = mean + std * noise in three fused ops, from constants folded
    once per schedule (upstream's float32 coefficients, combined in float64):

        mean = c1 * x0 + c2 * x_t, x0 = s1 * x_t - s2 * eps   ->  A_i * x_t + B_i * eps
        std = exp(log_var / 2), log_var = lo + (v + 1) / 2 * (hi - lo)  ->  exp(P_i + Q_i * v)

    with lo the clipped posterior log-variance and hi log beta (learned range). A and B are
    Python floats, P and Q 0-d device tensors (no per-step host copy, no per-step views)."""

    def __init__(self, schedule: DiffusionSchedule, device: torch.device) -> None:
        def f32(values: np.ndarray) -> np.ndarray:  # as upstream gathers them
            return values.astype(np.float32).astype(np.float64)

        s1 = f32(schedule.sqrt_recip_alphas_cumprod)
        s2 = f32(schedule.sqrt_recipm1_alphas_cumprod)
        c1, c2 = f32(schedule.posterior_mean_coef1), f32(schedule.posterior_mean_coef2)
        lo, hi = f32(schedule.posterior_log_variance_clipped), f32(schedule.log_betas)
        self.a, self.b = (c1 * s1 + c2).tolist(), (-c1 * s2).tolist()
        as_tensors = torch.tensor(np.stack([(lo + hi) / 4, (hi - lo) / 4]), dtype=torch.float32)
        self.p, self.q = (list(t.to(device).unbind(0)) for t in as_tensors)
        self.timestep_map = torch.from_numpy(schedule.timestep_map).to(device)
        # (T, 4): A, B, P, Q of each index, for a traced step (one region for every step)
        self.table = (
            torch.tensor([self.a, self.b, *as_tensors.tolist()], dtype=torch.float32)
            .t()
            .contiguous()
            .to(device)
        )

    def update(self, i: int, x: Tensor, eps: Tensor, v: Tensor, noise: Tensor) -> Tensor:
        """x_{i-1} from x_i, the net's eps and variance interpolation v; `noise` is already
        scaled by the temperature (unused at i = 0, the last step)."""
        out = x.mul(self.a[i]).add_(eps, alpha=self.b[i])
        if i > 0:
            out.addcmul_(torch.addcmul(self.p[i], v, self.q[i]).exp_(), noise)
        return out


# ----------------------------------------------------------------------------------------------
# Training loss (used by our own training script; upstream `training_losses`, MSE + VB)


def _gather(arr: np.ndarray, t: Tensor) -> Tensor:
    return torch.from_numpy(arr).to(t.device)[t].float()[:, None]


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood of x in [-1, 1] under a Gaussian discretised into 256 bins."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def training_loss(
    net: torch.nn.Module, sched: DiffusionSchedule, x_start: Tensor, t: Tensor, c: Tensor
) -> Tensor:
    """Per-row loss: eps MSE + variational bound on the learned variance (mean detached)."""
    noise = torch.randn_like(x_start)
    x_t = (
        _gather(np.sqrt(sched.alphas_cumprod), t) * x_start
        + _gather(np.sqrt(1.0 - sched.alphas_cumprod), t) * noise
    )
    out = net(x_t, t, c)
    channels = x_start.shape[1]
    eps, v = out[:, :channels], out[:, channels:]
    mse = ((noise - eps) ** 2).mean(dim=1)

    # VB term: learns the variance interpolation v only (the mean's gradient is stopped).
    frac = (v + 1) / 2
    log_var = frac * _gather(sched.log_betas, t) + (1 - frac) * _gather(
        sched.posterior_log_variance_clipped, t
    )
    eps_frozen = eps.detach()
    x0_pred = (
        _gather(sched.sqrt_recip_alphas_cumprod, t) * x_t
        - _gather(sched.sqrt_recipm1_alphas_cumprod, t) * eps_frozen
    )
    c1, c2 = _gather(sched.posterior_mean_coef1, t), _gather(sched.posterior_mean_coef2, t)
    model_mean = c1 * x0_pred + c2 * x_t
    true_mean = c1 * x_start + c2 * x_t
    true_log_var = _gather(sched.posterior_log_variance_clipped, t)
    kl = _normal_kl(true_mean, true_log_var, model_mean, log_var).mean(dim=1) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * log_var)
    nll = nll.mean(dim=1) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return mse + vb
