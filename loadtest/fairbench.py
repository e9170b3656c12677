"""Fair scheduling, measured: fifo against fair and deadline on the same arrivals, in one run.

    python -m loadtest.fairbench --engine flat --workload mixed     # make fairbench
    python -m loadtest.fairbench --engine real --workload mixed     # digits on this CPU
    python -m loadtest.fairbench --engine flat --workload tenants   # tenant A floods

Workloads (open-loop Poisson arrivals, the same plan for every policy):

* `mixed`: 80 % small requests (1 image, 32 steps) and 20 % large ones (16 images, 128
  steps) at `--load` × the engine's capacity: the load of deploy/README.md's routing analysis,
  where fifo kept a small request waiting ~50× its idle time.
* `tenants`: two API keys; tenant A sends 10× tenant B's rate, and A alone offers `--load` ×
  capacity (above 1: a flood). Requests are 1 image, 32 steps; each tenant may keep
  `--tenant-queue` requests waiting (429 past that).

Each policy runs on its own server (`marche serve`, or `loadtest.flat_engine`'s synthetic
engine whose step time is flat in rows, as a GPU's), started once. The plan is cut into
`--rounds` segments; each round plays its segment against every policy in turn, the order
rotating, and waits for every answer before the next (`--together`: all policies at once on
the whole plan, for the flat engine, whose steps sleep). Reported per policy and request
class: p50/p99 latency, the longest queue wait (X-Queue-Seconds), throughput, 429/503s, and
the ratios the issue's targets are stated in. JSON, a markdown table and a plot go to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from loadtest import loadbench
from loadtest.loadbench import percentile

KINDS = {  # request classes: (images, steps)
    "small": (1, 32),
    "large": (16, 128),
    "a": (1, 32),
    "b": (1, 32),
}
KEYS = {"a": "sk-fairbench-tenant-a", "b": "sk-fairbench-tenant-b"}


@dataclass
class Arrival:
    at_s: float
    kind: str


@dataclass
class Sample:
    kind: str
    sent_s: float
    latency_s: float
    status: int
    queue_s: float | None
    images: int


def plan(workload: str, rate: float, duration: float, seed: int = 7) -> list[Arrival]:
    """Arrivals at `rate` requests/s in all (tenants: `rate` is A's, B sends a tenth)."""
    rng, out = random.Random(seed), []
    if workload == "mixed":
        t = 0.0
        while (t := t + rng.expovariate(rate)) < duration:
            out.append(Arrival(t, "small" if rng.random() < 0.8 else "large"))
        return out
    for kind, kind_rate in (("a", rate), ("b", rate / 10)):
        t = 0.0
        while (t := t + rng.expovariate(kind_rate)) < duration:
            out.append(Arrival(t, kind))
    return sorted(out, key=lambda a: a.at_s)


async def send(client: httpx.AsyncClient, arrival: Arrival, i: int, t0: float) -> Sample:
    images, steps = KINDS[arrival.kind]
    body = {"class_id": i % 10, "seed": i, "num_images": images, "steps": steps}
    headers = {"Authorization": f"Bearer {KEYS[arrival.kind]}"} if arrival.kind in KEYS else {}
    sent = time.perf_counter()
    try:
        r = await client.post("/generate", json=body, headers=headers)
        status, queue = r.status_code, r.headers.get("x-queue-seconds")
    except httpx.HTTPError:
        status, queue = 0, None
    latency = time.perf_counter() - sent
    return Sample(arrival.kind, sent - t0, latency, status, float(queue) if queue else None,
                  images)  # fmt: skip


async def play(url: str, arrivals: list[Arrival], offset: int = 0) -> list[Sample]:
    """Send `arrivals` on time (relative to the first), wait for every answer."""
    start = arrivals[0].at_s if arrivals else 0.0
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits()) as client:
        t0, tasks = time.perf_counter(), []
        for i, a in enumerate(arrivals):
            await asyncio.sleep(max(0.0, t0 + a.at_s - start - time.perf_counter()))
            tasks.append(asyncio.create_task(send(client, a, offset + i, t0)))
        return list(await asyncio.gather(*tasks))


def server(policy: str, port: int, args) -> contextlib.AbstractContextManager[str]:
    """`loadbench.server` (continuous batching) under `policy`, with the tenants' keys and
    waiting limit for that workload."""
    settings = {"MARCHE_SCHEDULING_POLICY": policy, "MARCHE_REQUEST_TIMEOUT_S": "900"}
    if args.workload == "tenants":
        settings |= {"MARCHE_API_KEYS": ",".join(KEYS.values()),
                     "MARCHE_TENANT_QUEUE_SIZE": str(args.tenant_queue)}  # fmt: skip
    return loadbench.server("continuous", port, args.max_batch_size, args.engine, settings)


def idle_latency(url: str, kinds: list[str], repeats: int) -> dict[str, float]:
    """Median latency of each request class alone on an idle server."""
    out = {}
    for kind in kinds:
        samples = [
            asyncio.run(play(url, [Arrival(0.0, kind)], 900_000 + i))[0] for i in range(repeats + 1)
        ][1:]  # fmt: skip  (the first one warms up)
        out[kind] = round(statistics.median(s.latency_s for s in samples), 3)
    return out


def capacity(url: str, width: int, seconds: float, kind: str = "small") -> float:
    """Image-steps per second: a closed loop of 2 × width requests of `kind`."""
    images, steps = KINDS[kind]

    async def run() -> int:
        done, t_end = 0, time.perf_counter() + seconds
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:

            async def loop(c: int) -> None:
                nonlocal done
                i = 0
                while time.perf_counter() < t_end:
                    s = await send(client, Arrival(0, kind), 800_000 + 1000 * c + i, 0.0)
                    done += s.status == 200
                    i += 1

            await asyncio.gather(*(loop(c) for c in range(2 * width)))
        return done

    started = time.perf_counter()
    done = asyncio.run(run())
    if not done:
        raise RuntimeError(f"no {kind} request succeeded while measuring capacity")
    return done * images * steps / (time.perf_counter() - started)


async def gather_all(runs: list) -> list[list[Sample]]:
    return list(await asyncio.gather(*runs))


def summarize(samples: list[Sample], idle: dict[str, float], span: float) -> dict:
    """Per request class; throughput over `span`, the seconds the policy's runs took."""
    out: dict = {"images_per_s": round(sum(s.images for s in samples if s.status == 200)
                                       / span, 3) if span else 0.0}  # fmt: skip
    for kind in sorted({s.kind for s in samples}):
        mine = [s for s in samples if s.kind == kind]
        ok = [s.latency_s for s in mine if s.status == 200]
        waits = [s.queue_s for s in mine if s.status == 200 and s.queue_s is not None]
        row = {
            "requests": len(mine), "ok": len(ok),
            "refused_429": sum(s.status == 429 for s in mine),
            "refused_503": sum(s.status == 503 for s in mine),
            "errors": sum(s.status not in (200, 429, 503) for s in mine),
            "p50_s": round(percentile(ok, 0.5), 3), "p99_s": round(percentile(ok, 0.99), 3),
            "max_queue_s": round(max(waits), 3) if waits else None,
            "images_per_s": round(sum(s.images for s in mine if s.status == 200) / span, 3),
        }  # fmt: skip
        if kind in idle:
            row["p99_over_idle"] = round(row["p99_s"] / idle[kind], 2)
        out[kind] = row
    return out


def targets(workload: str, results: dict) -> dict:
    """The issue's ratios, each policy against fifo (tenants: B against its idle latency)."""
    fifo, out = results["fifo"], {}
    for policy, r in results.items():
        if workload == "mixed":
            out[policy] = {
                "small_p99_vs_fifo": round(r["small"]["p99_s"] / fifo["small"]["p99_s"], 3),
                "large_p99_vs_fifo": round(r["large"]["p99_s"] / fifo["large"]["p99_s"], 3),
                "throughput_vs_fifo": round(r["images_per_s"] / fifo["images_per_s"], 3),
            }
        else:
            out[policy] = {"b_p99_over_idle": r["b"].get("p99_over_idle"),
                           "a_images_per_s": r["a"]["images_per_s"],
                           "b_images_per_s": r["b"]["images_per_s"]}  # fmt: skip
    return out


def table(report: dict) -> str:
    lines = ["| policy | class | requests | ok | 429 | 503 | p50 s | p99 s | p99 / idle | "
             "longest wait s | images/s |", "|---" * 11 + "|"]  # fmt: skip
    for policy, r in report["results"].items():
        for kind, row in r.items():
            if kind == "images_per_s":
                continue
            lines.append(
                f"| {policy} | {kind} | {row['requests']} | {row['ok']} | {row['refused_429']} "
                f"| {row['refused_503']} | {row['p50_s']} | {row['p99_s']} | "
                f"{row.get('p99_over_idle', '')} | {row['max_queue_s']} | {row['images_per_s']} |"
            )
    lines += ["", "| policy | " + " | ".join(next(iter(report["targets"].values()))) + " |"]
    lines.append("|---" * (1 + len(next(iter(report["targets"].values())))) + "|")
    for policy, t in report["targets"].items():
        lines.append(f"| {policy} | " + " | ".join(str(v) for v in t.values()) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in next(iter(report["results"].values())) if k != "images_per_s"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6))
    for ax, kind in zip(axes if len(kinds) > 1 else [axes], kinds, strict=True):
        for policy, samples in report["samples"].items():
            ok = [s for s in samples if s["kind"] == kind and s["status"] == 200]
            lat = sorted(s["latency_s"] for s in ok)
            if lat:
                ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=policy)
        if kind in report["idle_s"]:
            ax.axvline(report["idle_s"][kind], color="grey", ls=":", label="idle")
        ax.set_xscale("log")
        ax.set_xlabel(f"{kind}: latency (s)")
        ax.set_ylabel("fraction of requests")
        ax.legend()
    fig.suptitle(f"{report['workload']} load on the {report['engine']} engine "
                 f"({report['load']:.0%} of capacity)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=("flat", "real"), default="flat")
    p.add_argument("--workload", choices=("mixed", "tenants"), default="mixed")
    p.add_argument("--policies", default="fifo,fair,deadline")
    p.add_argument("--load", type=float, default=0.8, help="mixed: of capacity; tenants: A's")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--together", action="store_true", help="every policy at once (flat)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--tenant-queue", type=int, default=32)
    p.add_argument("--capacity-s", type=float, default=30.0)
    p.add_argument("--idle-repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=8310)
    p.add_argument("--out", type=Path, default=Path("docs/results/fairbench"))
    args = p.parse_args(argv)
    policies = args.policies.split(",")
    kinds = ["small", "large"] if args.workload == "mixed" else ["a", "b"]
    with contextlib.ExitStack() as stack:
        urls = {pol: stack.enter_context(server(pol, args.port + i, args))
                for i, pol in enumerate(policies)}  # fmt: skip
        first = urls[policies[0]]
        idle = idle_latency(first, kinds, args.idle_repeats)
        cap = capacity(first, args.max_batch_size, args.capacity_s, kinds[0])
        mean_work = (0.8 * 32 + 0.2 * 16 * 128) if args.workload == "mixed" else 32
        rate = args.load * cap / mean_work
        log(f"idle {idle}, capacity {cap:.1f} image-steps/s, {rate:.3f} requests/s")
        arrivals = plan(args.workload, rate, args.duration)
        samples: dict[str, list[Sample]] = {pol: [] for pol in policies}
        wall = dict.fromkeys(policies, 0.0)  # seconds each policy took, answers included
        if args.together:
            started = time.perf_counter()
            everything = asyncio.run(gather_all([play(urls[pol], arrivals) for pol in policies]))
            for pol, got in zip(policies, everything, strict=True):
                samples[pol], wall[pol] = got, max(s.sent_s + s.latency_s for s in got)
            log(f"all policies together in {time.perf_counter() - started:.0f} s")
        else:
            cut = args.duration / args.rounds
            for r in range(args.rounds):
                segment = [a for a in arrivals if r * cut <= a.at_s < (r + 1) * cut]
                order = policies[r % len(policies) :] + policies[: r % len(policies)]
                for pol in order:
                    started = time.perf_counter()
                    samples[pol] += asyncio.run(play(urls[pol], segment, 10_000 * r))
                    wall[pol] += time.perf_counter() - started
                    log(f"round {r + 1}/{args.rounds}: {pol}, {len(segment)} requests, "
                        f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    results = {pol: summarize(s, idle, wall[pol]) for pol, s in samples.items()}
    report = {"workload": args.workload, "engine": args.engine, "load": args.load,
              "duration_s": args.duration, "rounds": 1 if args.together else args.rounds,
              "max_batch_size": args.max_batch_size, "capacity_image_steps_s": round(cap, 1),
              "rate_rps": round(rate, 4), "idle_s": idle, "results": results,
              "targets": targets(args.workload, results) if "fifo" in results else {},
              "samples": {pol: [asdict(s) for s in v] for pol, v in samples.items()}}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.workload}_{args.engine}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(table(report))
    plot(report, stem.with_suffix(".png"))
    sys.stdout.write(table(report))
    return 0


def log(message: str) -> None:
    sys.stderr.write(f"[fairbench] {message}\n")


if __name__ == "__main__":
    sys.exit(main())
