"""`marche bench --units MODE`: eager vs the diffusion head and the transformer's passes
(full, and MARché's lazy ones) as units per bucket (`engine/decode/units/`), per mode and
batch, interleaved in one process; `--no-eager` times the units alone.

Both runners share the pipeline (same weights, same seeds); each round times every (mode,
batch) with eager then with the units, so a slow spell of a shared machine hits both. Each
runner keeps one step engine per batch size across rounds, as a server keeps its engine, so
units bound to a slot pool (MARché's refill and lazy passes) are built in the warm-up round:
a whole run for the units, only the first steps for eager (which builds nothing; at batch 128
a whole eager run is a minute of a GPU's time). No phase is timed on its own (a timer would
synchronise the device between phases): the runs are token generation, no VAE. Reports, per
runner, median ms per AR step, s/image and peak device memory; the speed-up, and the largest
token difference between the two runs (the units' rounding); each mode's speed-up over exact
MAR under the same runner; and what the units cost to build (seconds, memory) and how often
they served a call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from engine.decode.marche import MarcheConfig
from engine.decode.policy import make_policy
from engine.decode.step import StepEngine
from engine.decode.units.build import AUTO
from engine.decode.units.common import DecodeUnits, timed
from engine.eval.bench import admit_images, device_name
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline


def run_batch(
    pipe: Pipeline,
    engine: StepEngine,
    mode: str,
    batch: int,
    params,
    marche,
    max_steps: int | None = None,
) -> tuple:
    """Seconds, tokens and peak device memory (bytes; None off CUDA) of `batch` images (the
    seeds and classes `generate` gives them) run through `engine`, to the end or for
    `max_steps` steps. The caller keeps `engine` across rounds as the server keeps its step
    engine: units bound to its slot pool are built once, in the warm-up round."""
    config = make_policy(mode, marche).config
    out: list[torch.Tensor] = []
    cuda = pipe.device.type == "cuda"

    def generate() -> None:
        rows = admit_images(pipe, engine, batch, params, config)
        steps = 0
        with pipe.autocast():
            while not rows[0].finished and (max_steps is None or steps < max_steps):
                engine.step(rows)
                steps += 1
        out.append(engine.tokens(rows))
        for row in rows:
            engine.release(row)

    if cuda:
        torch.cuda.reset_peak_memory_stats(pipe.device)
    seconds = timed(pipe.device, generate)
    peak = torch.cuda.max_memory_allocated(pipe.device) if cuda else None
    return seconds, out[0].float(), peak


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
    eager: bool = True,
    eager_warmup_steps: int = 2,
    on_row: Callable[[dict], None] | None = None,
) -> dict:
    """Eager (unless not `eager`) vs `units_mode` units on `model` (random weights unless
    digits); buckets "auto" are sized by the largest of `batches`. `on_row(report)` hears
    of the report each time a row is complete (the CLI writes its JSON then)."""
    pipe = Pipeline.load(model, device=device, dtype=dtype, random_weights=model != "digits")
    started = time.perf_counter()
    pipe.use_units(units_mode, head_buckets, pass_buckets, guided=(params.cfg != 1.0,),
                   max_batch_size=max(batches))  # fmt: skip
    build_s = time.perf_counter() - started
    if not any(pipe.units.families().values()):
        raise ValueError(f"--units {units_mode} builds nothing on {pipe.device}")
    runners = {"eager": DecodeUnits()} if eager else {}
    runners["units"] = pipe.units
    times: dict[tuple, list[float]] = {}
    peaks: dict[tuple, int | None] = {}
    diffs: dict[tuple, float] = {}
    engines: dict[tuple, StepEngine] = {}  # (runner, batch): one pool each, as a server has
    report = {
        "model": model,
        "device": device_name(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "units_mode": units_mode,
        "eager": eager,
        "steps": params.num_iter,
        "cfg": params.cfg,
        "repeats": repeats,
        "start_up_build_s": build_s,
        "units": {},
        "rows": [],
    }

    def row_of(mode: str, batch: int) -> dict:
        row: dict = {"mode": mode, "batch": batch}
        for name in runners:
            seconds = statistics.median(times[(mode, batch, name)])
            row[f"{name}_ms_per_step"] = 1e3 * seconds / params.num_iter
            row[f"{name}_s_per_image"] = seconds / batch
            row[f"{name}_peak_bytes"] = peaks[(mode, batch, name)]
            mar = times.get(("mar", batch, name), [])
            if len(mar) == repeats:  # exact MAR's runs are all in
                row[f"{name}_vs_mar"] = statistics.median(mar) / seconds
        if eager:
            row["speedup"] = row["eager_ms_per_step"] / row["units_ms_per_step"]
            row["max_token_diff"] = diffs[(mode, batch)]
        return row

    for round_ in range(repeats + 1):  # round 0 warms up (and builds lazily captured units)
        for mode in modes:
            for batch in batches:
                tokens = {}
                for name, units in runners.items():
                    pipe.units = units
                    if (name, batch) not in engines:
                        engines[(name, batch)] = pipe.step_engine(batch)
                    engine = engines[(name, batch)]
                    warm_eager = round_ == 0 and name == "eager"
                    seconds, tokens[name], peak = run_batch(
                        pipe, engine, mode, batch, params, marche,
                        eager_warmup_steps if warm_eager else None,
                    )  # fmt: skip
                    if round_:
                        times.setdefault((mode, batch, name), []).append(seconds)
                        key = (mode, batch, name)
                        peaks[key] = None if peak is None else max(peak, peaks.get(key) or 0)
                if round_ and eager:
                    diff = (tokens["eager"] - tokens["units"]).abs().max().item()
                    diffs[(mode, batch)] = max(diffs.get((mode, batch), 0.0), diff)
                if round_ == repeats:  # the row is complete: report it now, so that a run
                    report["rows"].append(row_of(mode, batch))  # stopped later keeps it
                    report["units"] = {
                        name: units.stats.as_dict()
                        for name, units in runners["units"].families().items()
                        if units is not None
                    }
                    if on_row is not None:
                        on_row(report)
    pipe.units = runners["units"]
    report["rows"] = [row_of(mode, batch) for mode in modes for batch in batches]  # all vs mar
    return report
