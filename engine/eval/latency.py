"""`marche bench --head-graphs MODE`: the diffusion head eager vs as one unit per row bucket
(`engine/decode/graphs.py`), per mode and batch, interleaved in one process.

Both runners share the pipeline (same weights, same seeds); each round times every (mode,
batch) with eager then with the units, so a slow spell of a shared machine hits both. Reports
median ms per AR step, the speed-up, the largest token difference between the two runs (the
units' rounding), and what the units cost to build (seconds, memory) and how often they
served a head call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from engine.decode import head as head_sampling
from engine.decode.graphs import DEFAULT_BUCKETS, build
from engine.decode.marche import MarcheConfig
from engine.decode.policy import PRESETS, make_policy
from engine.eval.bench import device_name
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline


def _run(pipe: Pipeline, mode: str, batch: int, params: SamplingParams, marche) -> tuple:
    classes = [i % pipe.num_classes for i in range(batch)]
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    started = time.perf_counter()
    tokens = pipe.generate_tokens(classes, list(range(batch)), params, make_policy(mode, marche))
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return time.perf_counter() - started, tokens.float()


def head_graphs_table(
    model: str,
    head_mode: str,
    modes: Sequence[str],
    batches: Sequence[int],
    params: SamplingParams,
    device: str = "auto",
    dtype: str = "auto",
    repeats: int = 3,
    marche: MarcheConfig | None = None,
    buckets: str | Sequence[int] = DEFAULT_BUCKETS,
) -> dict:
    """Eager vs `head_mode` units on `model` (random weights unless digits)."""
    pipe = Pipeline.load(model, device=device, dtype=dtype, random_weights=model != "digits")
    with pipe.autocast():
        started = time.perf_counter()
        units = build(pipe.model.diffloss, head_mode, buckets, PRESETS.values())
        build_s = time.perf_counter() - started
    if units is None:
        raise ValueError(f"--head-graphs {head_mode} builds nothing on {pipe.device}")
    runners = {"eager": head_sampling.sample, head_mode: units}
    times: dict[tuple, list[float]] = {}
    diffs: dict[tuple, float] = {}
    for round_ in range(repeats + 1):  # round 0 warms up (and builds lazily captured units)
        for mode in modes:
            for batch in batches:
                tokens = {}
                for name, runner in runners.items():
                    pipe.sample_head = runner
                    seconds, tokens[name] = _run(pipe, mode, batch, params, marche)
                    if round_:
                        times.setdefault((mode, batch, name), []).append(seconds)
                diff = (tokens["eager"] - tokens[head_mode]).abs().max().item()
                diffs[(mode, batch)] = max(diffs.get((mode, batch), 0.0), diff)
    pipe.sample_head = head_sampling.sample
    rows = []
    for mode in modes:
        for batch in batches:
            eager = statistics.median(times[(mode, batch, "eager")]) / params.num_iter
            unit = statistics.median(times[(mode, batch, head_mode)]) / params.num_iter
            rows.append({
                "mode": mode, "batch": batch, "eager_ms_per_step": eager * 1e3,
                "units_ms_per_step": unit * 1e3, "speedup": eager / unit,
                "max_token_diff": diffs[(mode, batch)],
            })  # fmt: skip
    return {
        "model": model,
        "device": device_name(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "head_graphs": head_mode,
        "steps": params.num_iter,
        "cfg": params.cfg,
        "repeats": repeats,
        "start_up_build_s": build_s,
        "units": units.stats.as_dict(),
        "rows": rows,
    }
