"""Open-loop load benchmark: static vs continuous batching, side by side.

    python -m loadtest.loadbench                       # digits on this machine (make loadbench)
    MARCHE_MODEL=mar_base MARCHE_RANDOM_WEIGHTS=1 python -m loadtest.loadbench --steps 64
    python -m loadtest.loadbench --engine flat --schedulers continuous   # make loadbench-flat

`--engine flat` runs the same app, worker and scheduler on `loadtest.flat_engine`'s synthetic
engine, whose step time is flat in rows as on a GPU at moderate batch (the curve and its source
are in that module): the scheduler's own queueing, without this CPU's row-linear steps.

For each scheduler it starts `marche serve --scheduler S` (one server at a time, so they
never share the machine; any `MARCHE_*` variable reaches the server), then measures:

1. idle latency: sequential single requests (median);
2. capacity: a closed loop of `2 x max_batch_size` clients for a while (completions/s);
3. open-loop Poisson arrivals at each `--loads` fraction of the reference capacity (the
   first scheduler's, continuous by default, so both see the same absolute arrival rates):
   throughput, p50/p95/p99 latency, queue wait (the server's X-Queue-Seconds), mean
   occupancy (rows per decoding step, from /metrics), 503s.

Writes JSON, a markdown table and a latency plot (PNG). Open loop matters: closed-loop clients
slow down when the server does, and hide queueing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtest.slo import parse_prometheus


@dataclass
class Sample:
    sent_s: float  # since the phase started
    latency_s: float
    status: int
    queue_s: float | None


def body(i: int, steps: int | None) -> dict:
    b = {"class_id": i % 10, "seed": i, "format": "png"}
    return b | ({"steps": steps} if steps else {})


async def request(client: httpx.AsyncClient, i: int, steps: int | None, t0: float) -> Sample:
    sent = time.perf_counter()
    try:
        r = await client.post("/generate", json=body(i, steps))
        status, queue = r.status_code, r.headers.get("x-queue-seconds")
    except httpx.HTTPError:
        status, queue = 0, None
    latency = time.perf_counter() - sent
    return Sample(sent - t0, latency, status, float(queue) if queue else None)


async def open_loop(url: str, rate: float, duration: float, steps: int | None, seed: int):
    """Poisson arrivals at `rate`/s for `duration` s; waits for every answer."""
    rng, arrivals, t = random.Random(seed), [], 0.0
    while (t := t + rng.expovariate(rate)) < duration:
        arrivals.append(t)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits()) as client:
        t0, tasks = time.perf_counter(), []
        for i, at in enumerate(arrivals):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(request(client, 100_000 + i, steps, t0)))
        return await asyncio.gather(*tasks)


async def closed_loop(url: str, clients: int, duration: float, steps: int | None) -> float:
    """Completions/s of `clients` back-to-back clients (after one warm round)."""
    done: list[float] = []

    async def client_loop(client: httpx.AsyncClient, c: int, t_end: float) -> None:
        i = 0
        while time.perf_counter() < t_end:
            s = await request(client, c * 10_000 + i, steps, 0.0)
            if s.status == 200:
                done.append(time.perf_counter())
            i += 1

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, c, start + duration) for c in range(clients)))
    settled = [t for t in done if t > start + duration / 4]  # skip the ramp-up
    return len(settled) / (max(settled) - (start + duration / 4)) if len(settled) > 1 else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(samples: list[Sample], occupancy: float | None) -> dict:
    ok = [s for s in samples if s.status == 200]
    span = max(s.sent_s + s.latency_s for s in samples) if samples else 0.0
    waits = [s.queue_s for s in ok if s.queue_s is not None]
    latencies = [s.latency_s for s in ok]
    return {
        "requests": len(samples),
        "ok": len(ok),
        "shed_503": sum(s.status == 503 for s in samples),
        "errors": sum(s.status not in (200, 503) for s in samples),
        "throughput_rps": round(len(ok) / span, 3) if span else 0.0,
        "p50_s": round(percentile(latencies, 0.50), 3),
        "p95_s": round(percentile(latencies, 0.95), 3),
        "p99_s": round(percentile(latencies, 0.99), 3),
        "mean_queue_s": round(statistics.fmean(waits), 3) if waits else None,
        "mean_occupancy": occupancy,
    }


def scrape(url: str) -> dict[str, float]:
    return parse_prometheus(httpx.get(url + "/metrics", timeout=10).text)


@contextlib.contextmanager
def server(
    scheduler: str, port: int, max_batch_size: int, engine: str = "real",
    settings: dict[str, str] | None = None, log_path: str | Path | None = None,
) -> Iterator[str]:  # fmt: skip
    """`marche serve --scheduler S` on localhost:port until ready (`engine="flat"`: the same
    app on `loadtest.flat_engine`'s synthetic engine), with more `MARCHE_*` `settings`;
    its output to `log_path` (else dropped); stopped on exit."""
    env = os.environ | {"MARCHE_SCHEDULER": scheduler, "MARCHE_MAX_BATCH_SIZE": str(max_batch_size),
                        "MARCHE_QUEUE_SIZE": "512", **(settings or {})}  # fmt: skip
    if engine == "flat":
        cmd = [sys.executable, "-m", "loadtest.flat_engine", "--port", str(port)]
    else:
        cmd = [sys.executable, "-c", "from marche.cli import main; main()", "serve",
               "--port", str(port)]  # fmt: skip
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            time.sleep(0.5)
        else:
            raise RuntimeError("server not ready in 600 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log is not subprocess.DEVNULL:
            log.close()


def bench_scheduler(args, scheduler: str, reference: float | None) -> dict:
    def log(message: str) -> None:
        sys.stderr.write(f"[{scheduler}] {message}\n")

    server_log = args.server_log and f"{args.server_log}.{scheduler}"  # one file per scheduler
    with server(scheduler, args.port, args.max_batch_size, args.engine,
                log_path=server_log) as url:  # fmt: skip
        info = httpx.get(url + "/info", timeout=10).json()
        idle = []
        for i in range(args.idle_requests + 1):  # the first one is discarded
            sample = asyncio.run(_one(url, i, args.steps))
            if i:
                idle.append(sample.latency_s)
        idle_s = statistics.median(idle)
        log(f"idle latency {idle_s:.3f} s")
        capacity = asyncio.run(
            closed_loop(url, 2 * args.max_batch_size, args.capacity_s, args.steps)
        )
        log(f"capacity {capacity:.3f} req/s")
        rate_ref = reference or capacity
        loads = {}
        for load in args.loads:
            before = scrape(url)
            samples = asyncio.run(open_loop(url, load * rate_ref, args.duration, args.steps, 7))
            after = scrape(url)
            count = after.get("marche_step_rows_count", 0) - before.get("marche_step_rows_count", 0)
            total = after.get("marche_step_rows_sum", 0) - before.get("marche_step_rows_sum", 0)
            row = summarize(samples, round(total / count, 2) if count else None)
            row |= {"offered_rps": round(load * rate_ref, 3)}
            loads[str(load)] = row
            log(f"load {load:.2f}: {row}")
    return {"scheduler": scheduler, "engine": args.engine, "model": info.get("model"),
            "idle_latency_s": round(idle_s, 3),
            "capacity_rps": round(capacity, 3), "loads": loads}  # fmt: skip


async def _one(url: str, i: int, steps: int | None) -> Sample:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return await request(client, i, steps, time.perf_counter())


def table(results: list[dict]) -> str:
    lines = [
        "| scheduler | load | offered req/s | throughput req/s | p50 s | p95 s | p99 s "
        "| p50 / idle | p99 / idle | mean queue s | mean occupancy | 503s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        idle = r["idle_latency_s"]
        for load, row in r["loads"].items():
            lines.append(
                f"| {r['scheduler']} | {float(load):.0%} | {row['offered_rps']} "
                f"| {row['throughput_rps']} | {row['p50_s']} | {row['p95_s']} | {row['p99_s']} "
                f"| {row['p50_s'] / idle:.2f} | {row['p99_s'] / idle:.2f} "
                f"| {row['mean_queue_s']} | {row['mean_occupancy']} | {row['shed_503']} |"
            )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r, color in zip(results, ("tab:blue", "tab:orange", "tab:green"), strict=False):
        loads = [float(x) for x in r["loads"]]
        rows = list(r["loads"].values())
        for key, style in (("p50_s", "-o"), ("p99_s", "--^")):
            ax.plot(loads, [row[key] for row in rows], style, color=color,
                    label=f"{r['scheduler']} {key[:3]}")  # fmt: skip
        ax.axhline(r["idle_latency_s"], color=color, linestyle=":", linewidth=1)
        ax2.plot(loads, [row["throughput_rps"] for row in rows], "-o", color=color,
                 label=r["scheduler"])  # fmt: skip
    ax2.plot(loads, [row["offered_rps"] for row in rows], ":", color="gray", label="offered")
    ax.set(xlabel="offered load (fraction of capacity)", ylabel="latency (s)", yscale="log",
           title="latency (dotted: idle)")  # fmt: skip
    ax2.set(xlabel="offered load (fraction of capacity)", ylabel="req/s", title="throughput")
    ax.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedulers", default="continuous,static")
    parser.add_argument("--loads", default="0.5,0.8,0.95")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per load")
    parser.add_argument("--capacity-s", type=float, default=30.0)
    parser.add_argument("--idle-requests", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--engine", choices=("real", "flat"), default="real",
                        help="flat: loadtest.flat_engine's synthetic engine, step time flat in "
                        "rows (a GPU at moderate batch)")  # fmt: skip
    parser.add_argument("--out", default="docs/results/loadbench")
    parser.add_argument("--server-log", default=None,
                        help="write the server's output to PATH.SCHEDULER")  # fmt: skip
    args = parser.parse_args(argv)
    args.loads = [float(x) for x in args.loads.split(",")]
    results, reference = [], None
    for scheduler in args.schedulers.split(","):
        result = bench_scheduler(args, scheduler, reference)
        reference = reference or result["capacity_rps"]
        results.append(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    env = {k: v for k, v in os.environ.items() if k.startswith("MARCHE_")}
    report = {"settings": settings, "env": env, "reference_capacity_rps": reference,
              "results": results}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(results) + "\n")
    plot(results, out.with_suffix(".png"))
    sys.stdout.write(table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
