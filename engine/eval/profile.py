"""Where a run's time goes, from `torch.profiler` (`marche bench --profile`).

Per mode and batch, one warm-up run, then one profiled run of the AR loop (no VAE; through a
step engine kept per batch, as `marche bench --units` runs it, with `--units` through the
units): its wall time per AR step; on a GPU, how busy the device was (the CUDA kernels' time
over the wall time: below 1 where the host's launches leave it idle) and the top kernels; on
a CPU, the top operators. `host_ms_per_step` is the operators' own CPU time per step: on a
GPU the time spent dispatching and launching, which bounds a launch-bound step from below.
The profiler adds its own per-operator cost, so read the wall times of `marche bench`, and
these for where the time goes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from engine.decode.policy import make_policy
from engine.eval.latency import run_batch
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline


def profile_table(
    model: str,
    modes: Sequence[str],
    batches: Sequence[int],
    params: SamplingParams,
    device: str = "auto",
    dtype: str = "auto",
    top: int = 8,
    units: str = "off",
) -> dict:
    """{"model", "device", "dtype", "units", "rows": [one summary per (batch, mode)]} on
    `model` (random weights unless digits), its phases run as `units` (sized for the largest
    of `batches`), or eager."""
    pipe = Pipeline.load(model, device=device, dtype=dtype, random_weights=model != "digits",
                         units=units, max_batch_size=max(batches))  # fmt: skip
    cuda = pipe.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    engines = {}  # one step engine per batch, kept as a server keeps it (its pool's units)

    def run(mode: str, batch: int) -> None:
        if batch not in engines:
            engines[batch] = pipe.step_engine(batch)
        run_batch(pipe, engines[batch], mode, batch, params, None)

    rows = []
    for batch in batches:
        for mode in modes:
            run(mode, batch)  # warm-up: allocations, kernels' autotuning, lazily built units
            with profile(activities=activities) as prof:
                started = time.perf_counter()
                run(mode, batch)
                wall = time.perf_counter() - started
            steps = make_policy(mode).config.num_steps(params.num_iter)
            rows.append(summary(prof, mode, batch, wall, steps, cuda, top))
    return {"model": model, "device": str(pipe.device), "dtype": str(pipe.dtype).split(".")[-1],
            "units": units, "steps": params.num_iter, "rows": rows}  # fmt: skip


def summary(
    prof: profile, mode: str, batch: int, wall: float, steps: int, cuda: bool, top: int
) -> dict:
    """One profiled run: wall and host time per step, device busy share, the top entries
    (CUDA kernels on a GPU, CPU operators otherwise) by their own time."""
    events = prof.key_averages()
    host_us = sum(e.self_cpu_time_total for e in events if e.device_type == DeviceType.CPU)
    if cuda:
        ranked = [e for e in events if e.device_type == DeviceType.CUDA]
        own = {e.key: e.self_device_time_total for e in ranked}
    else:
        ranked = [e for e in events if e.device_type == DeviceType.CPU]
        own = {e.key: e.self_cpu_time_total for e in ranked}
    total_us = sum(own.values())
    ranked.sort(key=lambda e: own[e.key], reverse=True)
    return {
        "mode": mode,
        "batch": batch,
        "steps": steps,
        "wall_s": wall,
        "ms_per_step": 1e3 * wall / steps,
        "host_ms_per_step": host_us / 1e3 / steps,
        "device_busy": total_us / 1e6 / wall if cuda else None,
        "top": [
            {
                "name": e.key,
                "calls": e.count,
                "ms": own[e.key] / 1e3,
                "share": own[e.key] / total_us if total_us else 0.0,
            }
            for e in ranked[:top]
        ],  # fmt: skip
    }
