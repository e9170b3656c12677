"""`marche bench`: time generation per decoding mode in one run, with per-phase seconds.

Official sizes run with random weights (speed does not depend on weight values); the digits
model runs with its shipped weights. Every mode sees the same classes, seeds and settings.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.decode.marche import MarcheConfig
from engine.decode.policy import make_policy
from engine.decode.profiling import PhaseTimer
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline

PHASES = ("encoder", "decoder", "diffusion_head", "vae")


@dataclass
class ModeResult:
    mode: str
    seconds: float  # wall time of the timed run(s), all phases
    images: int
    phases: dict[str, float] = field(default_factory=dict)
    active_fraction: float | None = None  # MARché: mean decoder active-token fraction

    @property
    def s_per_image(self) -> float:
        return self.seconds / self.images

    def to_dict(self) -> dict:
        per_image = {k: v / self.images for k, v in self.phases.items()}
        return {
            "mode": self.mode,
            "s_per_image": self.s_per_image,
            "seconds": self.seconds,
            "images": self.images,
            "phases_s_per_image": per_image,
            "active_fraction": self.active_fraction,
        }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_mode(
    pipe: Pipeline,
    mode: str,
    batch: int,
    params: SamplingParams,
    repeats: int,
    marche: MarcheConfig | None,
    seed: int = 0,
) -> ModeResult:
    timer = PhaseTimer(pipe.device)
    classes = [i % pipe.num_classes for i in range(batch)]
    seeds = [seed + i for i in range(batch)]
    fractions: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        policy = make_policy(mode, marche)
        tokens = pipe.generate_tokens(classes, seeds, params, policy, timer=timer)
        with timer.phase("vae"):
            pipe.decode(tokens)
        fractions += getattr(policy, "stats", [])
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    seconds = time.perf_counter() - start
    return ModeResult(
        mode,
        seconds,
        batch * repeats,
        {p: timer.seconds.get(p, 0.0) for p in PHASES},
        sum(fractions) / len(fractions) if fractions else None,
    )


def bench(
    model: str = "mar_base",
    modes: Sequence[str] = ("mar", "marche"),
    batch: int = 1,
    params: SamplingParams | None = None,
    device: str = "auto",
    dtype: str = "auto",
    repeats: int = 1,
    warmup_steps: int = 2,
    marche: MarcheConfig | None = None,
    compile: str = "off",
) -> dict:
    pipe = Pipeline.load(
        model, device=device, dtype=dtype, random_weights=model != "digits", compile=compile
    )
    params = params or pipe.spec.defaults
    # Warm-up: kernels, allocator and caches, on a short run of each mode. Compiled graphs are
    # specialised to each step's row count, so with --compile the warm-up is a full run.
    warm = params if compile != "off" else SamplingParams(warmup_steps, params.cfg)
    for mode in modes:
        run_mode(pipe, mode, batch, warm, 1, marche)
    results = {m: run_mode(pipe, m, batch, params, repeats, marche) for m in modes}
    report: dict = {
        "model": model,
        "device": device_name(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "batch": batch,
        "steps": params.num_iter,
        "cfg": params.cfg,
        "repeats": repeats,
        "compile": compile,
        "marche": (marche or MarcheConfig()).__dict__,
        "modes": {m: r.to_dict() for m, r in results.items()},
    }
    if "mar" in results and "marche" in results:
        report["speedup"] = results["mar"].seconds / results["marche"].seconds
    return report
