"""The table and plot of `scale_bench.py`'s JSON (also: `scale_bench --phases none`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def table(results: dict[str, Any]) -> str:
    lines = ["| phase | result |", "|---|---|"]
    if "throughput" in results:
        t = results["throughput"]
        one, two = t["1_replicas"], t["2_replicas"]
        lines.append(f"| throughput, closed loop | 1 replica {one['images_per_s']} images/s, 2 "
                     f"replicas on 2 nodes {two['images_per_s']}: **{t['scaling']}×** (cores "
                     f"busy: engines {one.get('engine_cores')} → {two.get('engine_cores')}, "
                     f"machine {one.get('busy_cores')} → {two.get('busy_cores')} of "
                     f"{os.cpu_count()}) |")  # fmt: skip
    if "routing" in results:
        r = results["routing"]
        for router in ("default", "work"):
            s = r[router]
            lines.append(f"| routing ({router}) | small p50 {s['small_p50_s']} s, p99 "
                         f"{s['small_p99_s']} s; large p50 {s['large_p50_s']} s; "
                         f"{s['images_per_s']} images/s; {s['statuses']} |")  # fmt: skip
        lines.append(f"| routing, small p99 work / default | **{r['small_p99_ratio']}** |")
    if "fairness" in results:
        f = results["fairness"]
        for policy in ("fifo", "fair"):
            s = f[policy]
            lines.append(f"| fairness ({policy}, 2 replicas) | small p50 {s['small_p50_s']} s, "
                         f"p99 {s['small_p99_s']} s; large p50 {s['large_p50_s']} s, p99 "
                         f"{s['large_p99_s']} s; {s['images_per_s']} images/s; "
                         f"{s['statuses']} |")  # fmt: skip
        lines.append(f"| fairness, fair / fifo | small p99 **{f['small_p99_ratio']}**, "
                     f"large p99 {f['large_p99_ratio']}, throughput "
                     f"{f['throughput_ratio']} |")  # fmt: skip
    if "autoscale" in results:
        a = results["autoscale"]
        lines.append(f"| autoscale 1 → 2 → 1 | up at {a['scaled_up_at_s']} s, down at "
                     f"{a['scaled_down_at_s']} s (idle from {a['idle_from_s']} s); "
                     f"{a['load']['non_200']} of {a['load']['requests']} not 200 |")  # fmt: skip
    if "upgrade" in results:
        u = results["upgrade"]
        lines.append(f"| rolling upgrade under load | {u['failed']} failed of {u['requests']} "
                     f"({u['statuses']}) |")  # fmt: skip
    if "nodeloss" in results:
        n = results["nodeloss"]
        back = n["replica_back_after_node_joined_s"]
        lines.append(f"| node loss | in flight: {n['in_flight'].get('statuses')}; after: "
                     f"{n['after_loss'].get('statuses')}; replica back {back} s after a node "
                     "joined |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Routing (small and large requests' p50/p99 per router) and autoscaling (replicas over
    time, the load step shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    routing = results.get("routing", {})
    routers = [r for r in ("default", "work") if r in routing]
    keys = ("small_p50_s", "small_p99_s", "large_p50_s", "large_p99_s")
    for k, router in enumerate(routers):
        xs = [i + (k - 0.5) * 0.38 for i in range(len(keys))]
        ax.bar(xs, [routing[router][key] for key in keys], width=0.38, label=f"{router} router")
    ax.set_xticks(range(len(keys)), [k.removesuffix("_s").replace("_", " ") for k in keys])
    ax.set(ylabel="latency (s)", title="mixed load at 70 % of 2 replicas")
    ax.legend(fontsize=8)
    auto = results.get("autoscale", {})
    if auto.get("timeline"):
        times, counts = zip(*auto["timeline"], strict=True)
        ax2.step(times, counts, where="post", label="running engine replicas")
        ax2.axvspan(0, auto["idle_from_s"], alpha=0.15, color="tab:orange", label="load step")
        ax2.set(xlabel="s", ylabel="replicas", yticks=[0, 1, 2], ylim=(0, 2.5),
                title="autoscaling on work (min 1, max 2)")  # fmt: skip
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
