"""Scale-out benchmark on a real multi-node Ray cluster on this machine (`make scale-bench`).

A head node and worker nodes (`ray.cluster_utils.Cluster`), each worker with one `fake_gpu`
standing in for a GPU, one engine replica per worker (digits, 1 torch thread each). Phases:

* throughput: 1 replica vs 2 replicas on 2 nodes, closed loop, the same requests: images/s;
* routing: mixed open-loop load (80 % 1-image 32-step, 20 % 16-image 128-step requests) at
  `--load` of the 2-replica capacity, Ray's default router vs the work-aware one, the same
  arrivals: p50/p99 of the small requests, throughput;
* fairness: the routing phase's load on 2 replicas (work-aware router), fifo against fair
  scheduling inside the replicas: small- and large-request p99, throughput;
* autoscale: min 1 / max 2 replicas on work; a load step, then idle: replica count over time;
* upgrade: a rolling restart of the engine (a changed code version) under steady load;
* nodeloss: a worker node's raylet killed with requests in flight, new requests arriving.

Writes JSON and a markdown table to `--out` (and a plot of the autoscaling run). One phase at a
time shares the machine: run this alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtest.loadbench import percentile
from loadtest.scale_report import plot, table

SMALL = {"num_images": 1, "steps": 32}
LARGE = {"num_images": 16, "steps": 128}
ENV = {
    "MARCHE_DEVICE": "cpu",
    "MARCHE_TORCH_THREADS": "1",
    "MARCHE_QUEUE_SIZE": "64",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "0.5",
    "RAY_memory_monitor_refresh_ms": "0",
}
INGRESS = {"ray_actor_options": {"num_cpus": 0, "resources": {"head_node": 0.01}}}


def log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def engine(**extra: Any) -> dict[str, Any]:
    return {
        "ray_actor_options": {"num_cpus": 0, "resources": {"fake_gpu": 1}},
        "health_check_period_s": 1,
        "graceful_shutdown_wait_loop_s": 0.2,
        "graceful_shutdown_timeout_s": 120,
        **extra,
    }


@dataclass
class Sample:
    kind: str  # small | large
    sent_s: float
    latency_s: float
    status: int


@contextlib.contextmanager
def cluster(
    workers: int, router: str = "work", policy: str = "fair"
) -> Iterator[tuple[Any, list, Any]]:
    """A head and `workers` fake-GPU nodes, Serve started; yields (cluster, nodes, deploy)."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    os.environ.update(ENV, MARCHE_ROUTER=router, MARCHE_SCHEDULING_POLICY=policy)
    system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"head_node": 1}, "_system_config": system},
    )
    try:
        nodes = [c.add_node(num_cpus=1, resources={"fake_gpu": 1}) for _ in range(workers)]
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": 8431})

        def deploy(engine_options: dict[str, Any]) -> None:
            from service.ray_serve.app import application

            app = application({"MarcheEngine": engine_options, "Ingress": INGRESS})
            serve.run(app, name="marche", route_prefix="/", blocking=False)

        yield c, nodes, deploy
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        c.shutdown()


URL = "http://127.0.0.1:8431"


async def post(client: httpx.AsyncClient, kind: str, i: int, t0: float) -> Sample:
    body = {"class_id": i % 10, "seed": i, **(SMALL if kind == "small" else LARGE)}
    sent = time.perf_counter()
    try:
        status = (await client.post("/generate", json=body)).status_code
    except httpx.HTTPError:
        status = 0
    return Sample(kind, sent - t0, time.perf_counter() - sent, status)


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used so far by the engine replicas' processes, by the whole machine)."""
    tick, engine = os.sysconf("SC_CLK_TCK"), 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if b"ServeReplica:marche:MarcheEngine" in (entry / "cmdline").read_bytes():
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                engine += int(fields[11]) + int(fields[12])  # utime + stime
    cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return engine / tick, (sum(cpu) - cpu[3] - cpu[4]) / tick  # busy: all but idle, iowait


async def closed_loop(clients: int, duration: float) -> dict[str, Any]:
    """Images/s of `clients` back-to-back 1-image clients (the first quarter is ramp-up), and
    where the machine's CPU went meanwhile (cores busy: the engine replicas' and in all)."""
    done: list[float] = []
    statuses: list[int] = []

    async def loop(client: httpx.AsyncClient, c: int, t_end: float) -> None:
        i = 0
        while time.perf_counter() < t_end:
            s = await post(client, "small", c * 100_000 + i, 0.0)
            statuses.append(s.status)
            if s.status == 200:
                done.append(time.perf_counter())
            i += 1

    async with httpx.AsyncClient(base_url=URL, timeout=600) as client:
        start, (engine0, busy0) = time.perf_counter(), cpu_seconds()
        await asyncio.gather(*(loop(client, c, start + duration) for c in range(clients)))
        (engine1, busy1), wall = cpu_seconds(), time.perf_counter() - start
    settled = [t for t in done if t > start + duration / 4]
    rate = len(settled) / (max(settled) - (start + duration / 4)) if len(settled) > 1 else 0.0
    return {"images_per_s": round(rate, 3), "requests": len(statuses),
            "non_200": sum(s != 200 for s in statuses),
            "engine_cores": round((engine1 - engine0) / wall, 2),
            "busy_cores": round((busy1 - busy0) / wall, 2)}  # fmt: skip


def arrivals(rate: float, duration: float, seed: int) -> list[tuple[float, str]]:
    rng, out, t = random.Random(seed), [], 0.0
    while (t := t + rng.expovariate(rate)) < duration:
        out.append((t, "large" if rng.random() < 0.2 else "small"))
    return out


async def open_loop(plan: list[tuple[float, str]]) -> list[Sample]:
    async with httpx.AsyncClient(base_url=URL, timeout=900, limits=httpx.Limits()) as client:
        t0, tasks = time.perf_counter(), []
        for i, (at, kind) in enumerate(plan):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(post(client, kind, 500_000 + i, t0)))
        return list(await asyncio.gather(*tasks))


def quantile(values: list[float], q: float) -> float | None:
    return round(percentile(values, q), 2) if values else None


def summary(samples: list[Sample]) -> dict[str, Any]:
    small = [s.latency_s for s in samples if s.kind == "small" and s.status == 200]
    large = [s.latency_s for s in samples if s.kind == "large" and s.status == 200]
    ok = [s for s in samples if s.status == 200]
    span = max((s.sent_s + s.latency_s for s in samples), default=0.0)
    images = sum(1 if s.kind == "small" else 16 for s in ok)
    codes = sorted({s.status for s in samples})
    return {
        "requests": len(samples),
        "ok": len(ok),
        "statuses": {str(c): sum(s.status == c for s in samples) for c in codes},
        "small_p50_s": quantile(small, 0.5),
        "small_p99_s": quantile(small, 0.99),
        "large_p50_s": quantile(large, 0.5),
        "large_p99_s": quantile(large, 0.99),
        "images_per_s": round(images / span, 3) if span else 0.0,
    }


def ready(replicas: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError):
            states = httpx.get(f"{URL}/info", timeout=10).json()["replicas"]["states"]
            if states.get("RUNNING") == replicas and sum(states.values()) == replicas:
                return
        time.sleep(1)
    raise TimeoutError(f"{replicas} replicas not running within {timeout} s")


def phase_throughput(args) -> dict[str, Any]:
    out = {}
    for n in (1, 2):
        with cluster(n) as (_, _, deploy):
            deploy(engine(num_replicas=n))
            ready(n)
            asyncio.run(closed_loop(4, 10))  # warm: kernels, allocator
            out[f"{n}_replicas"] = asyncio.run(closed_loop(args.clients, args.duration))
            log(f"throughput, {n} replica(s): {out[f'{n}_replicas']}")
    out["scaling"] = round(out["2_replicas"]["images_per_s"] / out["1_replicas"]["images_per_s"], 2)
    return out


def phase_routing(args, capacity_images_s: float) -> dict[str, Any]:
    mean_images = 0.8 * 1 + 0.2 * 16  # per request; steps differ too: weigh image-steps
    mean_work = 0.8 * 32 + 0.2 * 16 * 128  # image-steps per request
    capacity_work = capacity_images_s * 32  # image-steps/s of 2 replicas (1-image 32-step)
    rate = args.load * capacity_work / mean_work
    plan = arrivals(rate, args.routing_duration, seed=7)
    out: dict[str, Any] = {"rate_rps": round(rate, 4), "arrivals": len(plan),
                           "mean_images_per_request": mean_images}  # fmt: skip
    for router in ("default", "work"):  # under fifo, as measured before fair scheduling
        with cluster(2, router, "fifo") as (_, _, deploy):
            deploy(engine(num_replicas=2))
            ready(2)
            asyncio.run(closed_loop(4, 10))
            out[router] = summary(asyncio.run(open_loop(plan)))
            log(f"routing, {router}: {out[router]}")
    out["small_p99_ratio"] = round(out["work"]["small_p99_s"] / out["default"]["small_p99_s"], 3)
    return out


def phase_fairness(args, capacity_images_s: float) -> dict[str, Any]:
    """The routing phase's mixed load on 2 replicas (work-aware router), fifo against fair
    scheduling inside each replica, the same arrivals (docs/SERVING.md#fair-scheduling)."""
    mean_work = 0.8 * 32 + 0.2 * 16 * 128
    rate = args.load * capacity_images_s * 32 / mean_work
    plan = arrivals(rate, args.routing_duration, seed=7)
    out: dict[str, Any] = {"rate_rps": round(rate, 4), "arrivals": len(plan)}
    for policy in ("fifo", "fair"):
        with cluster(2, "work", policy) as (_, _, deploy):
            deploy(engine(num_replicas=2))
            ready(2)
            asyncio.run(closed_loop(4, 10))
            out[policy] = summary(asyncio.run(open_loop(plan)))
            log(f"fairness, {policy}: {out[policy]}")
    fifo, fair = out["fifo"], out["fair"]
    out["small_p99_ratio"] = round(fair["small_p99_s"] / fifo["small_p99_s"], 3)
    out["large_p99_ratio"] = round(fair["large_p99_s"] / fifo["large_p99_s"], 3)
    out["throughput_ratio"] = round(fair["images_per_s"] / fifo["images_per_s"], 3)
    return out


def replica_count() -> int:
    from ray import serve

    app = serve.status().applications.get("marche")
    states = app.deployments["MarcheEngine"].replica_states if app else {}
    return sum(n for s, n in states.items() if str(getattr(s, "value", s)) == "RUNNING")


def phase_autoscale(args) -> dict[str, Any]:
    scaling = {
        "min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 3, "downscale_delay_s": 30,
        "metrics_interval_s": 0.5, "look_back_period_s": 3,
        "policy": {"policy_function": "service.ray_serve.autoscaling:WorkPolicy",
                   "policy_kwargs": {"target_wait_s": args.target_wait_s}},
    }  # fmt: skip
    timeline: list[tuple[float, int]] = []
    with cluster(2) as (_, _, deploy):
        deploy(engine(autoscaling_config=scaling))
        ready(1)
        t0 = time.perf_counter()
        stop = False

        async def watch() -> None:
            while not stop:
                timeline.append((round(time.perf_counter() - t0, 1), replica_count()))
                await asyncio.sleep(1)

        async def run() -> dict[str, Any]:
            nonlocal stop
            watcher = asyncio.create_task(watch())
            # the load step: twice the clients one replica's batch holds, so work queues up
            load = await closed_loop(args.step_clients, args.step_duration)
            idle_from = time.perf_counter() - t0
            while time.perf_counter() - t0 < idle_from + args.idle_duration:
                await asyncio.sleep(1)
                if timeline and timeline[-1][1] == 1 and time.perf_counter() - t0 > idle_from + 5:
                    break
            stop = True
            await watcher
            return {"load": load, "idle_from_s": round(idle_from, 1)}

        result = asyncio.run(run())
    up = next((t for t, n in timeline if n == 2), None)
    down = next((t for t, n in timeline if n == 1 and up is not None and t > up), None)
    result.update(timeline=timeline, scaled_up_at_s=up, scaled_down_at_s=down)
    log(f"autoscale: up at {up} s, down at {down} s, {result['load']}")
    return result


def phase_upgrade(args, capacity_images_s: float) -> dict[str, Any]:
    rate = 0.3 * capacity_images_s  # 1-image 32-step requests at 30 % of 2 replicas
    plan = [(t, "small") for t, _ in arrivals(rate, args.upgrade_duration, seed=11)]
    with cluster(2) as (_, _, deploy):
        deploy(engine(num_replicas=2))
        ready(2)

        async def run() -> list[Sample]:
            load = asyncio.create_task(open_loop(plan))
            await asyncio.sleep(args.upgrade_duration / 4)
            started = time.perf_counter()
            env = {"runtime_env": {"env_vars": {"MARCHE_BUILD": "2"}}}  # a new code version
            actor = {**engine()["ray_actor_options"], **env}
            await asyncio.to_thread(deploy, engine(num_replicas=2, ray_actor_options=actor))
            log(f"upgrade: rolled out in {time.perf_counter() - started:.1f} s")
            return await load

        samples = asyncio.run(run())
    out = summary(samples)
    out["failed"] = sum(s.status != 200 for s in samples)
    log(f"upgrade: {out}")
    return out


def phase_nodeloss(args, capacity_images_s: float) -> dict[str, Any]:
    rate = 0.5 * capacity_images_s
    plan = [(t, "small") for t, _ in arrivals(rate, args.nodeloss_duration, seed=13)]
    with cluster(2) as (c, nodes, deploy):
        deploy(engine(num_replicas=2))
        ready(2)
        events: dict[str, float] = {}

        async def run() -> list[Sample]:
            load = asyncio.create_task(open_loop(plan))
            await asyncio.sleep(args.nodeloss_duration / 3)
            events["killed_s"] = time.perf_counter()
            nodes[0].kill_raylet()
            samples = await load
            return samples

        t0 = time.perf_counter()
        samples = asyncio.run(run())
        killed = events["killed_s"] - t0
        c.add_node(num_cpus=1, resources={"fake_gpu": 1})
        rejoined = time.perf_counter()
        ready(2)
        back_s = time.perf_counter() - rejoined
    in_flight = [s for s in samples if s.sent_s < killed < s.sent_s + s.latency_s]
    after = [s for s in samples if s.sent_s >= killed]
    out = {
        "in_flight": summary(in_flight) if in_flight else {},
        "after_loss": summary(after) if after else {},
        "before_loss": summary([s for s in samples if s.sent_s + s.latency_s <= killed]),
        "replica_back_after_node_joined_s": round(back_s, 1),
    }
    log(f"nodeloss: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--phases",
        default="throughput,routing,autoscale,upgrade,nodeloss",
        help="comma-separated; none: only the table and plot from the JSON",
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--load", type=float, default=0.7)
    parser.add_argument("--routing-duration", type=float, default=240.0)
    parser.add_argument("--step-duration", type=float, default=60.0)
    parser.add_argument("--step-clients", type=int, default=32)
    parser.add_argument("--idle-duration", type=float, default=90.0)
    parser.add_argument("--target-wait-s", type=float, default=5.0)
    parser.add_argument("--upgrade-duration", type=float, default=90.0)
    parser.add_argument("--nodeloss-duration", type=float, default=60.0)
    parser.add_argument("--capacity", type=float, help="2-replica images/s (skip throughput)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/scale_bench"))
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p and p != "none"]
    path = args.out.with_suffix(".json")
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    capacity = args.capacity
    for phase in phases:
        if phase == "throughput":
            results["throughput"] = phase_throughput(args)
        capacity = capacity or results.get("throughput", {}).get("2_replicas", {}).get(
            "images_per_s"
        )
        if phase in ("routing", "fairness", "upgrade", "nodeloss") and not capacity:
            parser.error(f"{phase} needs the 2-replica capacity: run throughput or --capacity")
        if phase == "routing":
            results["routing"] = phase_routing(args, capacity)
        elif phase == "fairness":
            results["fairness"] = phase_fairness(args, capacity)
        elif phase == "autoscale":
            results["autoscale"] = phase_autoscale(args)
        elif phase == "upgrade":
            results["upgrade"] = phase_upgrade(args, capacity)
        elif phase == "nodeloss":
            results["nodeloss"] = phase_nodeloss(args, capacity)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=lambda o: asdict(o)) + "\n")
    args.out.with_suffix(".md").write_text(table(results))
    plot(results, args.out.with_suffix(".png"))
    sys.stdout.write(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
