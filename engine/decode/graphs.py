"""The diffusion head as one unit per AR step: padded to a row bucket, compiled or captured.

At small batch a head call is T diffusion steps of about 14 + 6 x depth tiny ops each (1,189
per AR step for digits, 4,751 for MAR-B, `marche bench --dispatch`): on a GPU each is a launch,
so a lone image waits on dispatch. Once its plan (schedule, head-cache steps) is fixed, the
call is a pure function of five tensors (conditions z, x_T, the noise, temperature, cfg), so
it can run as one unit, keyed by (plan, guided, row bucket) as vLLM keys its decode graphs by
batch-size bucket:

* ``graphs`` (CUDA): the eager sampler (`head.sample`) captured as one `torch.cuda.CUDAGraph`
  per key and replayed: one launch per head call instead of thousands. The captured kernels
  are the eager ones, so a replay computes what eager computes on the same padded rows.
  Graphs of the model's own plans are captured at start-up; others (the annealed schedules of
  `turbo`, one per step count) on first use, up to `max_graphs`. All share one memory pool:
  they never run concurrently and each output is copied out before the next replay.
* ``compile`` (any device): the whole DDPM loop through `torch.compile` (inductor), the step
  body a `nested_compile_region` traced once and stamped T times, so compile time does not
  grow with the unrolled loop (digits: 138 s unrolled, about 10 s per bucket this way). Only
  plans without the head cache; compiling happens at start-up only, never while serving (a
  plan not compiled runs eager, counted as a miss).
* ``static``: the eager sampler on the bucket's padded buffers, without capture: the graphs'
  bookkeeping on any device (what the CPU tests exercise).

Rows are padded up to the next bucket (pad rows: zero x_T, noise and condition, cfg and
temperature 1); a call above the largest bucket runs eager. Every op of the head is per row,
so pad rows cannot change real ones; GEMM kernels chosen by row count may round differently
(tested at 1e-5).
"""

from __future__ import annotations

import bisect
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.decode import head as head_sampling
from engine.decode.head import HeadPlan
from engine.model import diffloss
from engine.model.diffloss import DiffLoss, SimpleMLPAdaLN

log = logging.getLogger(__name__)

HEAD_GRAPH_MODES = ("off", "static", "compile", "graphs", "auto")
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # head rows (tokens) per call


def parse_buckets(text: str | Sequence[int]) -> tuple[int, ...]:
    """ "1,2,4,8" (or a sequence) -> sorted unique positive bucket sizes."""
    sizes = [int(s) for s in text.split(",")] if isinstance(text, str) else [int(s) for s in text]
    if not sizes or min(sizes) < 1:
        raise ValueError("row buckets must be positive integers, e.g. 1,2,4,8")
    return tuple(sorted(set(sizes)))


def bucket_for(rows: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding `rows`; None above the largest (that call runs eager)."""
    i = bisect.bisect_left(buckets, rows)
    return buckets[i] if i < len(buckets) else None


@dataclass
class GraphStats:
    """What the head graphs did: built at start-up and since, hits, and eager fallbacks."""

    mode: str
    buckets: tuple[int, ...]
    built: int = 0  # graphs captured / compiled
    build_seconds: float = 0.0
    memory_bytes: int = 0  # device memory they hold (CUDA: the pool; else static buffers)
    hits: int = 0  # head calls served by a graph
    misses: int = 0  # head calls that ran eager (above the buckets, or plan not built)
    padded_rows: int = 0  # pad rows computed and discarded
    note: str = ""

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass(eq=False)
class _Buffers:
    """A bucket's static inputs, shared by every plan of that (guided, bucket)."""

    z: Tensor  # (b, D), or (2b, D) = [cond; uncond]
    x_T: Tensor  # (b, C)
    noise: Tensor  # (T_native, b, C)
    temperature: Tensor  # (b, 1)
    cfg: Tensor | None  # (b, 1)

    def load(self, z: Tensor, x_T: Tensor, noise: Tensor, temperature: Tensor, cfg) -> None:
        n, b = len(x_T), len(self.x_T)
        if self.cfg is not None:  # [cond; uncond] halves land at [0, n) and [b, b + n)
            self.z.view(2, b, -1)[:, :n].copy_(z.view(2, n, -1))
            self.cfg[:n].copy_(cfg)
        else:
            self.z[:n].copy_(z)
        self.x_T[:n].copy_(x_T)
        steps = min(len(noise), len(self.noise))  # the stream may hold more draws than used
        self.noise[:steps, :n].copy_(noise[:steps])
        self.temperature[:n].copy_(temperature)

    def tensors(self) -> list[Tensor]:
        every = (self.z, self.x_T, self.noise, self.temperature, self.cfg)
        return [t for t in every if t is not None]

    def args(self, plan: HeadPlan) -> tuple:
        noise = self.noise[: plan.schedule.num_timesteps]
        return self.z, self.x_T, noise, self.temperature, self.cfg


@dataclass(eq=False)
class _Graph:
    buffers: _Buffers
    run: Callable[[], Tensor]  # computes over `buffers`, returns (b, C)


@dataclass(eq=False, repr=False)
class HeadGraphs:
    """A head sampler (`head.sample`'s signature) that runs each call as one unit per
    (plan, guided, row bucket) under `mode` ("static", "compile" or "graphs")."""

    head: DiffLoss
    mode: str
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    max_graphs: int = 512
    stats: GraphStats = field(init=False)
    _buffers: dict[tuple[bool, int], _Buffers] = field(default_factory=dict, init=False)
    _graphs: dict[tuple, _Graph] = field(default_factory=dict, init=False)
    _pool: object = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.mode not in ("static", "compile", "graphs"):
            raise ValueError(f"head graphs mode must be static, compile or graphs: {self.mode}")
        self.buckets = parse_buckets(self.buckets)
        self.device = self.head.net.input_proj.weight.device
        if self.mode == "graphs":
            if self.device.type != "cuda":
                raise ValueError("head graphs mode 'graphs' needs a CUDA device")
            self._pool = torch.cuda.graph_pool_handle()
        self.stats = GraphStats(self.mode, self.buckets)

    def __repr__(self) -> str:
        return f"HeadGraphs({self.stats})"

    # -- the sampler -------------------------------------------------------------------------

    def __call__(
        self,
        head: DiffLoss,
        plan: HeadPlan,
        z: Tensor,
        x_T: Tensor,
        step_noise: Tensor,
        temperature: Tensor,
        cfg: Tensor | None,
    ) -> Tensor:
        n, guided = len(x_T), cfg is not None
        bucket = bucket_for(n, self.buckets)
        graph = None
        if head is self.head and bucket is not None:
            graph = self._graphs.get((plan.key, guided, bucket))
            if graph is None and self.mode != "compile" and len(self._graphs) < self.max_graphs:
                graph = self._build(plan, guided, bucket)  # lazy: cheap outside inductor
        if graph is None:
            self.stats.misses += 1
            return head_sampling.sample(head, plan, z, x_T, step_noise, temperature, cfg)
        graph.buffers.load(z, x_T, step_noise, temperature, cfg)
        self.stats.hits += 1
        self.stats.padded_rows += bucket - n
        return graph.run()[:n].clone()  # the next run overwrites its output

    # -- building ----------------------------------------------------------------------------

    def warm(self, plans: Sequence[HeadPlan], guided: Sequence[bool] = (True, False)) -> None:
        """Build every (plan, guided, bucket) now, largest bucket first (smaller graphs reuse
        the pool), and log how long it took and the memory held, as vLLM does."""
        started = time.perf_counter()
        free_before = self._free_memory()
        for bucket in reversed(self.buckets):
            for plan in plans:
                if self.mode == "compile" and plan.full is not None:
                    continue  # the head cache's plans stay eager under compile
                for g in guided:
                    if (plan.key, g, bucket) not in self._graphs:
                        self._build(plan, g, bucket)
        seconds = time.perf_counter() - started
        if free_before is not None:
            self.stats.memory_bytes += max(0, free_before - self._free_memory())
        log.info(
            "head %s: %d units for buckets %s in %.1f s, %.1f MiB",
            self.mode, len(self._graphs), ",".join(map(str, self.buckets)), seconds,
            self.stats.memory_bytes / 2**20,
        )  # fmt: skip

    def _free_memory(self) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        return torch.cuda.mem_get_info(self.device)[0]

    def _buffers_for(self, guided: bool, bucket: int) -> _Buffers:
        key = (guided, bucket)
        if key not in self._buffers:
            net, dev = self.head.net, self.device
            width = net.cond_embed.in_features
            channels, steps = net.in_channels, self.head.gen_schedule.num_timesteps
            buffers = _Buffers(
                z=torch.zeros((2 if guided else 1) * bucket, width, device=dev),
                x_T=torch.zeros(bucket, channels, device=dev),
                noise=torch.zeros(steps, bucket, channels, device=dev),
                temperature=torch.ones(bucket, 1, device=dev),
                cfg=torch.ones(bucket, 1, device=dev) if guided else None,
            )
            self._buffers[key] = buffers
            if dev.type != "cuda":
                self.stats.memory_bytes += sum(
                    t.numel() * t.element_size() for t in buffers.tensors()
                )
        return self._buffers[key]

    def _build(self, plan: HeadPlan, guided: bool, bucket: int) -> _Graph:
        started = time.perf_counter()
        buffers = self._buffers_for(guided, bucket)
        args = buffers.args(plan)
        if self.mode == "static":
            graph = _Graph(buffers, lambda: head_sampling.sample(self.head, plan, *args))
        elif self.mode == "compile":
            loop = compiled_loop(self.head.net, plan, guided)
            loop(*args)  # compiles now, not while serving
            graph = _Graph(buffers, lambda: loop(*args))
        else:
            graph = self._capture(plan, buffers, args)
        self._graphs[(plan.key, guided, bucket)] = graph
        self.stats.built += 1
        self.stats.build_seconds += time.perf_counter() - started
        return graph

    def _capture(self, plan: HeadPlan, buffers: _Buffers, args: tuple) -> _Graph:
        """One CUDA graph of the eager sampler over `buffers` (warmed on a side stream first:
        lazy initialisation and allocator growth must not happen inside the capture)."""
        free_before = self._free_memory()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                head_sampling.sample(self.head, plan, *args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = head_sampling.sample(self.head, plan, *args)
        self.stats.memory_bytes += max(0, (free_before or 0) - (self._free_memory() or 0))

        def replay() -> Tensor:
            graph.replay()
            return out

        return _Graph(buffers, replay)


# -- the compiled DDPM loop ------------------------------------------------------------------


def compiled_loop(net: SimpleMLPAdaLN, plan: HeadPlan, guided: bool) -> Callable[..., Tensor]:
    """`diffloss.sample` for `plan` (no head cache) as one compiled function of
    (z, x_T, noise, temperature, cfg): the prologue (condition and time embeddings, every
    step's adaLN outputs in blocks, the scaled noise) and T stamped copies of the step body
    (`nested_compile_region`: traced once). The same maths as eager; inductor fuses the
    elementwise ops, so results agree to rounding (tested at 1e-5 relative in fp32)."""
    if plan.full is not None:
        raise ValueError("the compiled loop covers plans without the head cache")
    schedule = plan.schedule
    num_t, width, depth = schedule.num_timesteps, net.input_proj.out_features, len(net.res_blocks)
    terms = schedule.step_terms(net.input_proj.weight.device)
    device = terms.timestep_map.device
    # everything in loop order (draw k runs diffusion index T-1-k)
    tmap = terms.timestep_map.flip(0)  # (T,)
    coef = torch.tensor(  # (T, 4): A, B, P, Q of each step
        [[terms.a[i], terms.b[i], float(terms.p[i]), float(terms.q[i])]
         for i in reversed(range(num_t))], device=device,
    )  # fmt: skip
    noisy = torch.ones(num_t, 1, 1, device=device)
    noisy[-1] = 0.0  # the last step (index 0) adds no noise
    layers = [*net.res_blocks, net.final_layer]
    mod_weights = [layer.adaLN_modulation[-1].weight for layer in layers]
    mod_biases = [_scale_plus_one(layer.adaLN_modulation[-1].bias, width) for layer in layers]
    weights = net.lean_weights()
    channels = net.in_channels

    @torch.compiler.nested_compile_region
    def body(x: Tensor, mods: Tensor, co: Tensor, noise: Tensor, cfg: Tensor) -> Tensor:
        pieces = list(mods.view(mods.shape[0], 3 * depth + 2, width).unbind(1))  # (R, W) each
        out = net.forward_lean(x, pieces, weights, guided).float()  # (R, 2C)
        eps, v = out.split(channels, dim=1)
        if guided:
            cond_eps, uncond_eps = eps.chunk(2)
            eps, v = torch.lerp(uncond_eps, cond_eps, cfg), v[: len(x)]
        return x * co[0] + eps * co[1] + torch.exp(co[2] + v * co[3]) * noise

    def loop(z: Tensor, x_T: Tensor, noise: Tensor, temperature: Tensor, cfg) -> Tensor:
        cfg = cfg if guided else temperature  # unguided: an unused stand-in
        c_emb = net.cond_embed(z)  # (R, W)
        t_emb = net.time_embed(tmap)  # (T, W)
        scaled = noise[:num_t] * temperature * noisy  # (T, N, C)
        block = max(1, min(num_t, diffloss.MODULATION_BUDGET // (len(z) * net.modulation_width)))
        x = x_T
        for lo in range(0, num_t, block):
            act = F.silu(c_emb[None] + t_emb[lo : lo + block, None])  # (blk, R, W)
            mods = torch.cat(
                [F.linear(act, w, b) for w, b in zip(mod_weights, mod_biases, strict=True)], -1
            )  # (blk, R, modulation_width)
            for j in range(mods.shape[0]):
                x = body(x, mods[j], coef[lo + j], scaled[lo + j], cfg)
        return x

    return torch.compile(loop, dynamic=False, fullgraph=True, isolate_recompiles=True)


def _scale_plus_one(bias: Tensor, width: int) -> Tensor:
    """An adaLN bias with the 1 of (1 + scale) folded into its scale part."""
    return torch.cat([bias[:width], bias[width : 2 * width] + 1, bias[2 * width :]])


def head_plans(head: DiffLoss, configs: Sequence) -> list[HeadPlan]:
    """The plans worth building at start-up: each config's plan at step 0 when its head
    schedule is constant (the same plan every step; annealed ones change per step)."""
    plans: dict[tuple, HeadPlan] = {}
    for config in configs:
        if config.head.schedule != "constant":
            continue
        plan = head_sampling.HeadPolicy(config.head).plan(head, 0, 2)
        plans.setdefault(plan.key, plan)
    return list(plans.values())


def build(
    head: DiffLoss, mode: str, buckets: str | Sequence[int], configs: Sequence
) -> HeadGraphs | None:
    """The head runner for `mode` (`HEAD_GRAPH_MODES`), built for `configs`' plans; None
    means eager. "auto" captures CUDA graphs and keeps them only if a guided call at the
    smallest bucket measures faster than eager on this device; off the GPU it is eager
    (inductor takes ~10-25 s per plan and bucket on CPU: a start-up cost, not a default)."""
    if mode not in HEAD_GRAPH_MODES:
        raise ValueError(f"head graphs must be one of {', '.join(HEAD_GRAPH_MODES)}: {mode!r}")
    device = head.net.input_proj.weight.device
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    plans = head_plans(head, configs)
    runner = HeadGraphs(head, "graphs" if mode == "auto" else mode, parse_buckets(buckets))
    if mode == "auto":
        eager_s, graph_s = measure(runner, plans[0], runner.buckets[0])
        verdict = f"graphs {graph_s * 1e3:.2f} ms vs eager {eager_s * 1e3:.2f} ms per call"
        log.info("head graphs auto: %s", verdict)
        if graph_s >= eager_s:
            return None
        runner.stats.note = f"auto: {verdict}"
    runner.warm(plans)
    return runner


def measure(runner: HeadGraphs, plan: HeadPlan, rows: int, repeats: int = 7) -> tuple[float, float]:
    """Median seconds of one guided head call of `rows` rows, eager vs `runner`, interleaved."""
    net, dev = runner.head.net, runner.device
    steps = runner.head.gen_schedule.num_timesteps
    z = torch.randn(2 * rows, net.cond_embed.in_features, device=dev)
    x_T = torch.randn(rows, net.in_channels, device=dev)
    noise = torch.randn(steps, rows, net.in_channels, device=dev)
    temperature, cfg = torch.ones(rows, 1, device=dev), torch.full((rows, 1), 3.0, device=dev)
    args = (runner.head, plan, z, x_T, noise, temperature, cfg)
    times: dict[str, list[float]] = {"eager": [], "unit": []}
    for _ in range(repeats + 1):  # the first round warms both
        for name, fn in (("eager", head_sampling.sample), ("unit", runner)):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            started = time.perf_counter()
            fn(*args)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[name].append(time.perf_counter() - started)
    runner.stats.hits -= repeats + 1  # measuring is not serving
    return statistics.median(times["eager"][1:]), statistics.median(times["unit"][1:])
