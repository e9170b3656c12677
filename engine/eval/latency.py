"""`marche bench --graphs MODE`: eager vs the diffusion head and the transformer's plain
passes as units per row bucket (`engine/decode/graphs.py`), per mode and batch, interleaved
in one process.

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

from engine.decode.graphs import timed
from engine.decode.head_graphs import HEAD_BUCKETS
from engine.decode.marche import MarcheConfig
from engine.decode.pass_graphs import PASS_BUCKETS
from engine.decode.policy import make_policy
from engine.eval.bench import device_name
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline


def _run(pipe: Pipeline, mode: str, batch: int, params: SamplingParams, marche) -> tuple:
    classes, seeds = [i % pipe.num_classes for i in range(batch)], list(range(batch))
    out: list[torch.Tensor] = []
    seconds = timed(pipe.device, lambda: out.append(
        pipe.generate_tokens(classes, seeds, params, make_policy(mode, marche))))  # fmt: skip
    return seconds, out[0].float()


def units_table(
    model: str,
    units_mode: str,
    modes: Sequence[str],
    batches: Sequence[int],
    params: SamplingParams,
    device: str = "auto",
    dtype: str = "auto",
    repeats: int = 3,
    marche: MarcheConfig | None = None,
    head_buckets: str | Sequence[int] = HEAD_BUCKETS,
    pass_buckets: str | Sequence[int] = PASS_BUCKETS,
) -> dict:
    """Eager vs `units_mode` units on `model` (random weights unless digits)."""
    pipe = Pipeline.load(model, device=device, dtype=dtype, random_weights=model != "digits")
    started = time.perf_counter()
    pipe.use_graphs(units_mode, head_buckets, pass_buckets, guided=(params.cfg != 1.0,))
    build_s = time.perf_counter() - started
    if pipe.head_graphs is None and pipe.pass_graphs is None:
        raise ValueError(f"--graphs {units_mode} builds nothing on {pipe.device}")
    runners = {"eager": (None, None), units_mode: (pipe.head_graphs, pipe.pass_graphs)}
    times: dict[tuple, list[float]] = {}
    diffs: dict[tuple, float] = {}
    for round_ in range(repeats + 1):  # round 0 warms up (and builds lazily captured units)
        for mode in modes:
            for batch in batches:
                tokens = {}
                for name, (head_units, pass_units) in runners.items():
                    pipe.head_graphs, pipe.pass_graphs = head_units, pass_units
                    seconds, tokens[name] = _run(pipe, mode, batch, params, marche)
                    if round_:
                        times.setdefault((mode, batch, name), []).append(seconds)
                diff = (tokens["eager"] - tokens[units_mode]).abs().max().item()
                diffs[(mode, batch)] = max(diffs.get((mode, batch), 0.0), diff)
    pipe.head_graphs, pipe.pass_graphs = runners[units_mode]
    rows = []
    for mode in modes:
        for batch in batches:
            eager = statistics.median(times[(mode, batch, "eager")]) / params.num_iter
            unit = statistics.median(times[(mode, batch, units_mode)]) / params.num_iter
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
        "graphs": units_mode,
        "steps": params.num_iter,
        "cfg": params.cfg,
        "repeats": repeats,
        "start_up_build_s": build_s,
        "units": {
            name: units.stats.as_dict()
            for name, units in (("head", pipe.head_graphs), ("transformer", pipe.pass_graphs))
            if units is not None
        },
        "rows": rows,
    }
