"""`marche bench --flops`: FLOPs per image per phase (encoder, decoder, diffusion head, VAE).

Counted with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention;
FLOPs = 2 x multiply-adds; norms and elementwise ops are not counted, as in LazyMAR's and
the notes' FLOP model). Every decoding mode has static, host-known shapes, so FLOPs depend
on shapes only: the official sizes are counted on the **meta** device (no weights, no
compute; MAR-H in seconds), where SDPA decomposes into counted batched matmuls. On a real
CPU, PyTorch's flash-attention-for-CPU kernel has no FLOP formula, so `CPU_ATTENTION` adds
one; a test checks that the digits model counts the same on CPU and on meta for every mode.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from engine.decode.head import HeadPlan
from engine.decode.marche import MarcheConfig
from engine.decode.passes import head as head_pass
from engine.decode.policy import DecodeConfig, make_policy
from engine.decode.sampler import sample_tokens
from engine.decode.units.common import DecodeUnits, UnitStats
from engine.model.config import SamplingParams
from engine.model.diffloss import DiffLoss
from engine.model.mar import MAR
from engine.model.tokenizer import KL16Tokenizer, PixelTokenizer, Tokenizer
from engine.model.vae import KL16, AutoencoderKL
from engine.pipeline import MODELS

PHASES = ("encoder", "decoder", "diffusion_head", "vae")


def _sdpa_flops(query: torch.Size, key: torch.Size, value: torch.Size, *args, **kw) -> int:
    """2 * (QK^T + PV) multiply-adds of one attention call; shapes (..., L, E)."""
    *batch, lq, e = query
    lk, ev = key[-2], value[-1]
    rows = 1
    for d in batch:
        rows *= d
    return 2 * rows * lq * lk * (e + ev)


CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


class FlopTimer:
    """The sampler's phase-timer protocol, counting FLOPs per phase instead of seconds."""

    def __init__(self) -> None:
        self.flops: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            yield
        self.flops[name] += counter.get_total_flops()


class CountingHead:
    """Stands in for the head's units (the `Unit` protocol, serving every call): the head's
    FLOPs depend only on the call's shapes (rows, guidance, the step's head plan), so each
    distinct signature runs the eager pass (and is counted by the phase's counter) once;
    repeats add that count without running the 10^4 small ops again. Nothing is estimated:
    every number is a count of a call that ran."""

    def __init__(self, timer: FlopTimer) -> None:
        self.timer, self.stats = timer, UnitStats("counting", (1,))
        self.memo: dict[tuple, int] = {}

    def can_run(self, *args) -> bool:
        return True

    def run(self, head: DiffLoss, plan: HeadPlan, z: Tensor, x_T: Tensor, *rest) -> Tensor:
        num_t = plan.schedule.num_timesteps
        key = (tuple(z.shape), tuple(x_T.shape), rest[-1] is None, num_t, plan.mlp_steps)
        if key in self.memo:
            self.timer.flops["diffusion_head"] += self.memo[key]
            return torch.zeros_like(x_T)
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            out = head_pass.sample(head, plan, z, x_T, *rest)
        self.memo[key] = counter.get_total_flops()
        return out


class ShapeOnlyRandomness:
    """An order and noise of the right shapes with arbitrary values (FLOPs need no values)."""

    def __init__(self, seq_len: int, token_dim: int, steps: int, device) -> None:
        self.seq_len, self.token_dim, self.steps = seq_len, token_dim, steps
        self.device = torch.device(device)

    def order(self) -> Tensor:
        return torch.arange(self.seq_len, device=self.device).flip(0)

    def noise(self, step: int, pred_idx: Tensor) -> tuple[Tensor, Tensor]:
        k = len(pred_idx)
        x_t = torch.zeros(k, self.token_dim, device=self.device)
        return x_t, torch.zeros(self.steps, k, self.token_dim, device=self.device)


def build(name: str, device: str = "meta") -> tuple[MAR, Tokenizer]:
    """A model and tokenizer of `name`'s shapes (untrained weights; none at all on meta)."""
    config = MODELS[name].config
    with torch.device(device):
        model = MAR(config).eval()
        if config.tokenizer == "pixels":
            return model, PixelTokenizer(config)
        return model, KL16Tokenizer(config, AutoencoderKL(KL16).eval())


@torch.no_grad()
def count(
    model: MAR,
    tokenizer: Tokenizer,
    mode: str | DecodeConfig,
    params: SamplingParams,
    batch: int = 1,
    marche: MarcheConfig | None = None,
) -> dict[str, float]:
    """FLOPs per image per phase of one generation of `batch` images in `mode`."""
    device = model.class_emb.weight.device
    config = model.config
    timer = FlopTimer()
    steps = model.diffloss.gen_schedule.num_timesteps
    randomness = [
        ShapeOnlyRandomness(config.seq_len, config.token_embed_dim, steps, device)
    ] * batch
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    policy = make_policy(mode, marche)
    units = DecodeUnits(head=CountingHead(timer))  # the eager head: every op counted
    tokens = sample_tokens(model, labels, [params] * batch, randomness, policy, timer=timer,
                           units=units)  # fmt: skip
    with timer.phase("vae"):
        tokenizer.decode(tokens)
    per_image = {p: timer.flops.get(p, 0) / batch for p in PHASES}
    return {**per_image, "total": sum(per_image.values())}


def flops_table(
    models: Sequence[str],
    modes: Sequence[str],
    steps: int | None = None,
    cfg: float | None = None,
    batch: int = 1,
    marche: MarcheConfig | None = None,
) -> dict:
    """{model: {"params": ..., "modes": {mode: per-phase FLOPs}, "reduction": {mode: x}}}."""
    report: dict = {}
    for name in models:
        model, tokenizer = build(name)
        defaults = MODELS[name].defaults
        params = SamplingParams(
            num_iter=steps or defaults.num_iter,
            cfg=defaults.cfg if cfg is None else cfg,
            cfg_schedule=defaults.cfg_schedule,
        )
        rows = {m: count(model, tokenizer, m, params, batch, marche) for m in modes}
        entry: dict = {"steps": params.num_iter, "cfg": params.cfg, "modes": rows}
        if "mar" in rows:
            entry["reduction"] = {m: rows["mar"]["total"] / r["total"] for m, r in rows.items()}
        report[name] = entry
    return report
