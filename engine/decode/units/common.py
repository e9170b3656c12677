"""What every family of units shares: the unit protocol, buckets, stats, and how a
computation over static buffers becomes a unit (run as it is, compiled, or captured).

At small batch a decoding step is bound by dispatch: thousands of tiny ops (1,263 per AR step
for digits at batch 1, 5,015 for MAR-B, `marche bench --dispatch`), and on a GPU each is a
kernel launch. A phase whose shapes are fixed is a pure function of a few static buffers, so
it can run as one unit, keyed by its bucket as vLLM keys its decode graphs by batch size.
Each family mirrors its eager pass file for file (`passes/X.py` and `units/X.py`):

* `units/head.py`: the diffusion head, per (plan, guided, token bucket);
* `units/full.py`: the transformer's full pass (encoder, decoder; MARché's cache refills
  included), per (call bucket, known-token bucket), pad tokens masked out of attention;
* `units/lazy.py`: MARché's lazy pass (the append-only encoder, the cache-aware decoder), per
  (call bucket, appended, known, active tokens), positions computed on the device from a
  small plan per call.

Every family speaks one protocol (`Unit`, SGLang's shape): `can_run(*args)`, then
`run(*args)`, with the eager pass's arguments, returning what the eager pass returns. The step
engine chooses between a unit and the eager pass in one place (`run_phase`), which also counts
hits and misses. `units/build.py` builds the families for a mode (and measures "auto").

Modes (`UNITS_MODES`):

* ``cuda-graphs``: the eager code captured as one `torch.cuda.CUDAGraph` per key and replayed:
  one launch per unit. The captured kernels are eager's, so a replay computes what eager
  computes on the same padded rows. Captured at start-up for the shapes known then, later
  shapes on first use (a capture costs about two eager runs, its warm-up); all graphs share
  one memory pool: they never run concurrently and each output is copied out before the next
  replay. A unit that writes the slot pool is built on the inputs of the call it serves, so
  its warm-up writes what the call writes.
* ``compile``: inductor, at start-up only (on CPU about 10-25 s per unit): the head's whole
  DDPM loop (`passes/head.py`, traced), the transformer's encoder and decoder per unit.
* ``static``: the eager code on the padded static buffers, without capture: the units'
  bookkeeping on any device (what the CPU tests exercise), and a control for the padding cost.
* ``auto``: ``cuda-graphs`` on CUDA where a unit measures faster than eager there, else eager.

Pad rows are zeros (finite); every op is per row and pad keys get zero attention weight, so
pad rows cannot change real ones. GEMM kernels chosen by row count may round differently
(tested at 1e-5 of the output's scale). Calls no unit serves (above the largest bucket, a
plan not compiled) run eager and are counted.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

UNITS_MODES = ("off", "static", "compile", "cuda-graphs", "auto")  # the `units` setting
BUILT_MODES = ("static", "compile", "cuda-graphs")  # how a family's units are built


def parse_buckets(text: str | Sequence[int]) -> tuple[int, ...]:
    """ "1,2,4,8" (or a sequence) -> sorted unique positive bucket sizes."""
    sizes = [int(s) for s in text.split(",")] if isinstance(text, str) else [int(s) for s in text]
    if not sizes or min(sizes) < 1:
        raise ValueError("buckets must be positive integers, e.g. 1,2,4,8")
    return tuple(sorted(set(sizes)))


def bucket_for(size: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding `size`; None above the largest (that call runs eager)."""
    i = bisect.bisect_left(buckets, size)
    return buckets[i] if i < len(buckets) else None


@dataclass
class UnitStats:
    """What a family of units did: built at start-up and since, hits, and eager fallbacks."""

    mode: str
    buckets: tuple[int, ...]
    built: int = 0  # units captured / compiled / set up
    build_seconds: float = 0.0
    memory_bytes: int = 0  # device memory they hold (CUDA: graph pool; else static buffers)
    hits: int = 0  # calls served by a unit
    misses: int = 0  # calls that ran eager (above the buckets, or not built)
    padded_rows: int = 0  # pad rows computed and discarded
    note: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Unit(Protocol):
    """A family of units for one phase: `can_run` takes the eager pass's arguments and says
    whether a unit serves them; `run` runs it and returns what the eager pass returns."""

    stats: UnitStats

    def can_run(self, *args: Any) -> bool: ...

    def run(self, *args: Any) -> Any: ...


@dataclass
class DecodeUnits:
    """The phases of a step that run as units; None: that phase runs eager."""

    head: Unit | None = None  # `units.head.HeadUnits`
    full: Unit | None = None  # `units.full.FullUnits`
    lazy: Unit | None = None  # `units.lazy.LazyUnits`

    def families(self) -> dict[str, Unit | None]:
        return {"head": self.head, "full": self.full, "lazy": self.lazy}


def run_phase(units: Unit | None, eager: Callable[..., T], *args: Any) -> T:
    """The one place a phase runs as a unit or eager: a unit when one serves `args` (a hit),
    else the eager pass (a miss, when the phase has units)."""
    if units is not None:
        if units.can_run(*args):
            units.stats.hits += 1
            return units.run(*args)
        units.stats.misses += 1
    return eager(*args)


class Units:
    """What every family of units shares: its mode, stats, device and CUDA graph pool."""

    def __init__(
        self, mode: str, device: torch.device, buckets: Sequence[int], graph_pool=None
    ) -> None:
        """`graph_pool`: another family's CUDA graph pool to share (default: a new one)."""
        if mode not in BUILT_MODES:
            raise ValueError(f"unit mode must be one of {', '.join(BUILT_MODES)}: {mode!r}")
        if mode == "cuda-graphs" and device.type != "cuda":
            raise ValueError("mode 'cuda-graphs' needs a CUDA device")
        self.mode, self.device = mode, device
        self.stats = UnitStats(mode, parse_buckets(buckets))
        if graph_pool is None and mode == "cuda-graphs":
            graph_pool = torch.cuda.graph_pool_handle()
        self.graph_pool = graph_pool

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.stats})"

    def runner(self, fn: Callable[[], T]) -> Callable[[], T]:
        """`fn` (a computation over static buffers) as this mode runs it: as it is, compiled
        by inductor (now, not while serving), or captured in a CUDA graph (warmed on a side
        stream first, so that lazy initialisation and allocator growth happen outside the
        capture)."""
        if self.mode == "static":
            return fn
        if self.mode == "compile":
            compiled = torch.compile(fn, dynamic=False, fullgraph=True, isolate_recompiles=True)
            compiled()
            return compiled
        free_before = self.free_memory()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (an HTTP handler) cannot break a capture
        with torch.cuda.graph(graph, pool=self.graph_pool, capture_error_mode="thread_local"):
            out = fn()
        self.stats.memory_bytes += max(0, (free_before or 0) - (self.free_memory() or 0))

        def replay() -> T:
            graph.replay()
            return out

        return replay

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Counts the unit built inside, and the seconds its building took."""
        started = time.perf_counter()
        yield
        self.stats.built += 1
        self.stats.build_seconds += time.perf_counter() - started

    def count_buffers(self, *tensors: torch.Tensor | None) -> None:
        if self.device.type != "cuda":  # on CUDA the pool's growth is measured instead
            self.stats.memory_bytes += sum(
                t.numel() * t.element_size() for t in tensors if t is not None
            )

    def free_memory(self) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.mem_get_info(self.device)[0]

    def log_built(self, what: str, count: int, seconds: float) -> None:
        log.info(
            "%s %s: %d units for buckets %s in %.1f s, %.1f MiB", what, self.mode, count,
            ",".join(map(str, self.stats.buckets)), seconds, self.stats.memory_bytes / 2**20,
        )  # fmt: skip


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes on `device` (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def compare(device: torch.device, eager: Callable, unit: Callable, repeats: int = 7) -> tuple:
    """Median seconds of `eager()` and `unit()`, interleaved (the first round warms both)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats + 1):
        for seconds, fn in zip(times, (eager, unit), strict=True):
            seconds.append(timed(device, fn))
    return statistics.median(times[0][1:]), statistics.median(times[1][1:])
