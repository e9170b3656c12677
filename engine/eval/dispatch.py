"""`marche bench --dispatch`: operator calls per AR step and per phase, per mode and batch.

On a GPU every operator call that reaches a kernel is a launch (~5 µs or more of host time
each), so at small batch a step is bound by how many there are, not by its arithmetic. This
counts them device-independently: a `TorchDispatchMode` sees every ATen operator after
autograd and decomposition (`linear` arrives as `t` + `addmm`), attributed to the phase that
issued it (encoder, decoder, diffusion head, VAE) through the same `phase()` hooks the timing
benchmark uses; the rest of a step (scheduling positions, guidance, copies into the units'
buffers) is its glue, and admitting the images is counted apart, once per run. Views
(`is_view`: `view`, `t`, `expand`, `slice`, ...) and bare allocations launch no kernel but
still cost a CPU dispatch: they are counted apart. Ops that would make a GPU wait for the host
(`_local_scalar_dense`, `nonzero`, ...) are counted too. Each setting is counted on its second
run: the first also builds what later runs reuse (schedule tensors, caches). From then on the
count is deterministic, so a few steps of a random-weight model suffice.

With `units`, the head and the transformer's passes (full ones and MARché's lazy ones) run
as units (`engine/decode/units/`, "static" mode) and each unit run counts as one call
("replays"), the ops inside it not at all: what a step launches on a GPU under CUDA graphs
(the glue between units, the copies into their buffers, one launch per replay), counted
without a GPU.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _disable_current_modes,
    _get_current_dispatch_mode,
)

from engine.decode.marche import MarcheConfig
from engine.decode.policy import make_policy
from engine.decode.units.common import Units
from engine.eval.bench import admit_images
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline

STEP_PHASES = ("encoder", "decoder", "diffusion_head", "glue")  # glue: the rest of a step
PHASES = (*STEP_PHASES, "vae")
_aten = torch.ops.aten
NO_KERNEL = {_aten._unsafe_view.default, _aten.empty.memory_format, _aten.empty_strided.default}
SYNCS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default}


class OpCounter(TorchDispatchMode):
    """ATen calls per phase: `ops` (would launch a kernel), `free` (views, allocations),
    `syncs` (would wait for the device). It has `PhaseTimer`'s `phase()`, so it can be passed
    wherever a timer is."""

    def __init__(self) -> None:
        super().__init__()
        self.current = "other"
        self.ops: Counter[str] = Counter()
        self.free: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.replays: Counter[str] = Counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        outer, self.current = self.current, name
        try:
            yield
        finally:
            self.current = outer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.free if func.is_view or func in NO_KERNEL else self.ops)[self.current] += 1
        if func in SYNCS:
            self.syncs[self.current] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def units_as_replays() -> Iterator[None]:
    """While active, units built run their computation uncounted and count as one call (a
    graph replay) in the active `OpCounter`."""
    original = Units.runner

    def runner(self: Units, fn):
        def replay():
            counter = _get_current_dispatch_mode()
            if not isinstance(counter, OpCounter):
                return fn()
            counter.ops[counter.current] += 1
            counter.replays[counter.current] += 1
            with _disable_current_modes():
                return fn()

        return replay

    Units.runner = runner  # type: ignore[method-assign]
    try:
        yield
    finally:
        Units.runner = original  # type: ignore[method-assign]


def count_run(
    pipe: Pipeline,
    mode: str,
    batch: int,
    params: SamplingParams,
    marche: MarcheConfig | None,
    steps: int | None = None,
) -> OpCounter:
    """Operator calls of `batch` images admitted together (as `generate` admits them) over
    their first `steps` AR steps (a run's real schedule, not a shorter run: that would predict
    every token in fewer, heavier steps), then the VAE on their tokens. What a step does
    outside the encoder, decoder and head phases (scheduling, guidance, copies into the units'
    buffers) is its glue."""
    counter = OpCounter()
    config = make_policy(mode, marche).config
    with torch.inference_mode(), counter:
        engine = pipe.step_engine(batch)
        with counter.phase("admit"):
            rows = admit_images(pipe, engine, batch, params, config)
        with pipe.autocast(), counter.phase("glue"):
            for _ in range(min(steps or params.num_iter, len(rows[0].steps))):
                engine.step(rows, timer=counter)
        with counter.phase("vae"):
            pipe.decode(engine.tokens(rows))
    return counter


def dispatch_table(
    model: str,
    modes: Sequence[str],
    batches: Sequence[int],
    params: SamplingParams | None = None,
    marche: MarcheConfig | None = None,
    count_steps: int | None = None,
    units: bool = False,
) -> dict:
    """Per mode and batch: operator calls per AR step (each phase but the VAE, which runs once
    per image batch and is reported per run), views and allocations, would-be syncs; averaged
    over the run's first `count_steps` steps (all when None). `units`: units count as one
    call each (module docstring)."""
    pipe = Pipeline.load(model, device="cpu", dtype="fp32", random_weights=model != "digits")
    params = params or pipe.spec.defaults
    with units_as_replays() if units else contextlib.nullcontext():
        if units:
            pipe.use_units("static")
        return _table(pipe, model, modes, batches, params, marche, count_steps, units)


def _table(pipe, model, modes, batches, params, marche, count_steps, units) -> dict:
    steps = min(count_steps or params.num_iter, params.num_iter)
    rows = []
    for batch in batches:
        for mode in modes:
            count_run(pipe, mode, batch, params, marche, steps)  # builds what later runs reuse
            c = count_run(pipe, mode, batch, params, marche, steps)
            per_step = {p: round(c.ops[p] / steps, 1) for p in STEP_PHASES}
            rows.append({
                "mode": mode,
                "batch": batch,
                "ops_per_step": round(sum(per_step.values()), 1),
                "phases_per_step": per_step,
                "vae_ops": c.ops["vae"],
                "views_per_step": round(sum(c.free[p] for p in STEP_PHASES) / steps, 1),
                "syncs_per_step": round(sum(c.syncs[p] for p in STEP_PHASES) / steps, 2),
                "replays_per_step": round(sum(c.replays.values()) / steps, 1),
                "admit_ops": c.ops["admit"],  # per run: orders, slots, schedules
            })  # fmt: skip
    return {"model": model, "steps": params.num_iter, "counted_steps": steps, "cfg": params.cfg,
            "units": units, "rows": rows}  # fmt: skip
