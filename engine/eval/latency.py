"""`marche bench --units MODE`: eager vs the diffusion head and the transformer's passes
(full, and MARché's lazy ones) as units per bucket (`engine/decode/units/`), per mode and
batch, interleaved in one process.

Both runners share the pipeline (same weights, same seeds); each round times every (mode,
batch) with eager then with the units, so a slow spell of a shared machine hits both. Each
runner keeps one step engine per batch size across rounds, as a server keeps its engine, so
units bound to a slot pool (MARché's refill and lazy passes) are built in the warm-up round. Reports
median ms per AR step, the speed-up, the largest token difference between the two runs (the
units' rounding), and what the units cost to build (seconds, memory) and how often they
served a head call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from engine.decode.marche import MarcheConfig
from engine.decode.policy import make_policy
from engine.decode.step import StepEngine
from engine.decode.units.build import AUTO
from engine.decode.units.common import DecodeUnits, timed
from engine.eval.bench import admit_images, device_name
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline


def _run(pipe: Pipeline, engine: StepEngine, mode: str, batch: int, params, marche) -> tuple:
    """Seconds and tokens of `batch` images (the seeds and classes `generate` gives them) run
    to the end through `engine`, which the caller keeps across rounds as the server keeps
    its step engine: units bound to its slot pool are built once, in the warm-up round."""
    config = make_policy(mode, marche).config
    out: list[torch.Tensor] = []

    def generate() -> None:
        rows = admit_images(pipe, engine, batch, params, config)
        with pipe.autocast():
            while not rows[0].finished:
                engine.step(rows)
        out.append(engine.tokens(rows))
        for row in rows:
            engine.release(row)

    return timed(pipe.device, generate), out[0].float()


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
    head_buckets: str | Sequence[int] = AUTO,
    pass_buckets: str | Sequence[int] = AUTO,
) -> dict:
    """Eager vs `units_mode` units on `model` (random weights unless digits); buckets "auto"
    are sized by the largest of `batches`."""
    pipe = Pipeline.load(model, device=device, dtype=dtype, random_weights=model != "digits")
    started = time.perf_counter()
    pipe.use_units(units_mode, head_buckets, pass_buckets, guided=(params.cfg != 1.0,),
                   max_batch_size=max(batches))  # fmt: skip
    build_s = time.perf_counter() - started
    if not any(pipe.units.families().values()):
        raise ValueError(f"--units {units_mode} builds nothing on {pipe.device}")
    runners = {"eager": DecodeUnits(), units_mode: pipe.units}
    times: dict[tuple, list[float]] = {}
    diffs: dict[tuple, float] = {}
    engines: dict[tuple, StepEngine] = {}  # (runner, batch): one pool each, as a server has
    for round_ in range(repeats + 1):  # round 0 warms up (and builds lazily captured units)
        for mode in modes:
            for batch in batches:
                tokens = {}
                for name, units in runners.items():
                    pipe.units = units
                    if (name, batch) not in engines:
                        engines[(name, batch)] = pipe.step_engine(batch)
                    engine = engines[(name, batch)]
                    seconds, tokens[name] = _run(pipe, engine, mode, batch, params, marche)
                    if round_:
                        times.setdefault((mode, batch, name), []).append(seconds)
                diff = (tokens["eager"] - tokens[units_mode]).abs().max().item()
                diffs[(mode, batch)] = max(diffs.get((mode, batch), 0.0), diff)
    pipe.units = runners[units_mode]
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
        "units_mode": units_mode,
        "steps": params.num_iter,
        "cfg": params.cfg,
        "repeats": repeats,
        "start_up_build_s": build_s,
        "units": {
            name: units.stats.as_dict()
            for name, units in pipe.units.families().items()
            if units is not None
        },
        "rows": rows,
    }
