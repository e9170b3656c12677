"""`marche bench`: time generation per decoding mode in one run, with per-phase seconds
(`--flops`: count FLOPs instead, `engine.eval.flops`).

Official sizes run with random weights (speed does not depend on weight values); the digits
model runs with its shipped weights. Every mode sees the same classes, seeds and settings.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from engine.decode.marche import MarcheConfig
from engine.decode.policy import MODES, DecodeConfig, make_policy
from engine.decode.profiling import PhaseTimer
from engine.decode.sampler import StepInfo
from engine.decode.step import Row, StepEngine
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline

PHASES = ("encoder", "decoder", "diffusion_head", "vae")


@dataclass
class ModeResult:
    mode: str
    runs: list[float]  # wall seconds of each timed run (all phases), in run order
    images: int  # images per run
    phases: dict[str, float] = field(default_factory=dict)  # seconds summed over runs
    active_fraction: float | None = None  # MARché: mean decoder active-token fraction

    @property
    def s_per_image(self) -> float:
        """Median run time / images: robust to a run that another process slowed down."""
        return statistics.median(self.runs) / self.images

    def to_dict(self) -> dict:
        per_image = {k: v / (self.images * len(self.runs)) for k, v in self.phases.items()}
        return {
            "mode": self.mode,
            "s_per_image": self.s_per_image,
            "runs_s": self.runs,
            "images": self.images,
            "phases_s_per_image": per_image,
            "active_fraction": self.active_fraction,
        }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def admit_images(
    pipe: Pipeline, engine: StepEngine, batch: int, params: SamplingParams, config: DecodeConfig
) -> list[Row]:
    """The `batch` images a benchmark makes, as rows of `engine`: class i modulo the class
    count and seed i, as `run_once` generates them."""
    return [pipe.admit(engine, i % pipe.num_classes, i, params, config) for i in range(batch)]


def run_once(
    pipe: Pipeline,
    mode: str,
    batch: int,
    params: SamplingParams,
    marche: MarcheConfig | None,
    timer: PhaseTimer,
    seed: int = 0,
) -> tuple[float, list[float]]:
    """One generation of `batch` images (tokens + VAE): wall seconds, active fractions."""
    classes = [i % pipe.num_classes for i in range(batch)]
    seeds = [seed + i for i in range(batch)]
    policy = make_policy(mode, marche)
    start = time.perf_counter()
    tokens = pipe.generate_tokens(classes, seeds, params, policy, timer=timer)
    with timer.phase("vae"):
        pipe.decode(tokens)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return time.perf_counter() - start, list(getattr(policy, "stats", []))


def warm_up(
    pipe: Pipeline,
    modes: Sequence[str],
    batch: int,
    params: SamplingParams,
    marche: MarcheConfig | None,
    steps: int | None,
) -> None:
    """The first `steps` AR steps of a timed run of each mode (all of them when None), then
    the VAE once (it does not depend on the mode).

    Not a short run of `steps` steps: that predicts every token in those steps, so the
    diffusion head does a whole run's work (at batch 16, minutes per mode on a CPU), on
    row counts the timed run never sees."""

    def stop(info: StepInfo) -> list[bool] | None:
        return [False] * batch if steps is not None and info.step + 1 >= steps else None

    classes = [i % pipe.num_classes for i in range(batch)]
    for mode in modes:
        policy = make_policy(mode, marche)
        pipe.generate_tokens(classes, list(range(batch)), params, policy, on_step=stop)
    config = pipe.model.config
    pipe.decode(torch.zeros(batch, config.seq_len, config.token_embed_dim, device=pipe.device))
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)


def bench(
    model: str = "mar_base",
    modes: Sequence[str] = MODES,
    batch: int = 1,
    params: SamplingParams | None = None,
    device: str = "auto",
    dtype: str = "auto",
    repeats: int = 1,
    warmup_steps: int = 2,
    marche: MarcheConfig | None = None,
    progress: Callable[[str, int, float, dict[str, float]], None] | None = None,
) -> dict:
    """Time every mode on the same classes, seeds and settings. Timed runs interleave the
    modes (mar, marche, turbo, mar, ...), so a slow spell of a shared machine hits all of
    them; each mode reports its median run. `progress(mode, run, seconds, phases)` hears of
    each timed run as it ends, with that run's seconds per phase, so a run stopped part-way
    (a batch-16 table on a CPU takes hours) still leaves per-phase numbers."""
    pipe = Pipeline.load(model, device=device, dtype=dtype, random_weights=model != "digits")
    params = params or pipe.spec.defaults
    # Warm-up: kernels, allocator and caches, on the first steps of a real run of each mode.
    warm_up(pipe, modes, batch, params, marche, warmup_steps)
    phases: dict[str, dict[str, float]] = {m: dict.fromkeys(PHASES, 0.0) for m in modes}
    runs: dict[str, list[float]] = {m: [] for m in modes}
    fractions: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:
            timer = PhaseTimer(pipe.device)
            seconds, stats = run_once(pipe, mode, batch, params, marche, timer)
            run_phases = {p: timer.seconds.get(p, 0.0) for p in PHASES}
            for p, s in run_phases.items():
                phases[mode][p] += s
            runs[mode].append(seconds)
            fractions[mode] += stats
            if progress is not None:
                progress(mode, len(runs[mode]), seconds, run_phases)
    results = {
        m: ModeResult(
            m,
            runs[m],
            batch,
            phases[m],
            sum(fractions[m]) / len(fractions[m]) if fractions[m] else None,
        )
        for m in modes
    }
    report: dict = {
        "model": model,
        "device": device_name(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "batch": batch,
        "steps": params.num_iter,
        "cfg": params.cfg,
        "repeats": repeats,
        "units": "off",  # eager; units are timed by `engine.eval.latency`
        "marche": (marche or MarcheConfig()).__dict__,
        "modes": {m: r.to_dict() for m, r in results.items()},
    }
    if "mar" in results:
        mar = results["mar"].s_per_image
        report["speedup"] = {m: mar / r.s_per_image for m, r in results.items()}
    return report
