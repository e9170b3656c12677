"""Scale-out on a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a
head and two worker nodes, each worker with one `fake_gpu` standing in for a GPU), so placement,
routing and node loss go through Ray's own code paths:

* two engine replicas, one per node; /readyz and /info honest about them;
* the work-aware router live in the ingress (both replicas' reported work in /info; requests
  sent at once spread over both);
* a burst past both queues: refusals spill to the other replica, 503 only when both are full;
* a worker node killed (its raylet, no grace) with requests in flight: every /generate is
  answered (those on the lost replica retried on the survivor, counted), new requests are
  served, and a replica comes back once a node with a `fake_gpu` joins again.

Bounded for CI (digits, 1 torch thread per replica, short runs); timings are logged
(pytest --log-cli-level=INFO).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.servers import free_port, wait_for
from tests.service.test_api import metric_value

pytest.importorskip("ray.serve")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

log = logging.getLogger("marche.scale_out_test")
ENV = {
    "MARCHE_DEVICE": "cpu",
    "MARCHE_TORCH_THREADS": "1",
    "MARCHE_MAX_BATCH_SIZE": "2",
    "MARCHE_QUEUE_SIZE": "4",  # a survivor holds 2 + 4: the 4 in flight at a node loss, any split
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "0.5",  # a loaded 2-core machine
    "RAY_memory_monitor_refresh_ms": "0",  # one raylet's OOM monitor sees the whole host
    "RAY_metrics_report_interval_ms": "1000",
}
ENGINE = {
    "num_replicas": 2,
    "ray_actor_options": {"num_cpus": 0, "resources": {"fake_gpu": 1}},
    "health_check_period_s": 1,
    "graceful_shutdown_wait_loop_s": 0.2,
    "graceful_shutdown_timeout_s": 30,
}
INGRESS = {"ray_actor_options": {"num_cpus": 0, "resources": {"head_node": 0.01}}}


@pytest.fixture
def cluster(monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)  # raylets (and so replicas) inherit it
    system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    metrics_port = free_port()  # the head's exporter: the ingress's metrics live there
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"head_node": 1}, "_system_config": system,
                        "metrics_export_port": metrics_port},
    )  # fmt: skip
    try:
        workers = [cluster.add_node(num_cpus=1, resources={"fake_gpu": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        from service.ray_serve.app import application

        app = application({"MarcheEngine": ENGINE, "Ingress": INGRESS})
        serve.run(app, name="marche", route_prefix="/", blocking=False)
        yield cluster, workers, f"http://127.0.0.1:{port}", metrics_port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def split(base: str) -> list[tuple[int, int]]:
    """(running, waiting) requests of each engine replica, as the ingress's router last saw."""
    engines = httpx.get(f"{base}/info", timeout=30).json()["replicas"]["engines"]
    return [(e["running"], e["waiting"]) for e in engines]


def replica_states(base: str) -> dict[str, int]:
    return httpx.get(f"{base}/info", timeout=30).json()["replicas"]["states"]


def generate(base: str, seed: int, steps: int = 32) -> httpx.Response:
    job = {"class_id": seed % 10, "seed": seed, "steps": steps}
    return httpx.post(f"{base}/generate", json=job, timeout=180)


@pytest.mark.slow
def test_two_replicas_on_two_nodes_route_spill_and_survive_a_node_loss(cluster):
    cluster, workers, base, metrics_port = cluster

    def retries(reason: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        return metric_value(text, "ray_marche_engine_retries_total", reason=reason)

    started = time.monotonic()
    wait_for(lambda: _ready(base), 240, "ready")
    log.info("two engine replicas ready in %.1f s", time.monotonic() - started)
    ready = httpx.get(f"{base}/readyz", timeout=30).json()
    assert ready["reason"] == "ready: 2 of 2 engine replicas running"
    assert replica_states(base) == {"RUNNING": 2}

    # -- the router sees both replicas' work (reports every 0.5 s)
    with ThreadPoolExecutor(4) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda s: generate(base, s, 8), range(4)))
    engines = httpx.get(f"{base}/info", timeout=30).json()["replicas"]["engines"]
    assert len(engines) == 2 and all("image_steps" in e and e["rows"] == 2 for e in engines)

    # -- a burst past both queues: a replica holds at most 2 running + 4 waiting, so more than
    # 6 served means refusals went on to the other replica
    with ThreadPoolExecutor(24) as pool:
        burst = list(pool.map(lambda s: generate(base, s, 32), range(100, 124)))
    codes = [r.status_code for r in burst]
    assert set(codes) <= {200, 503} and codes.count(200) > 6 and 503 in codes, codes
    for r in (r for r in burst if r.status_code == 503):
        assert "every engine replica" in r.json()["detail"] and int(r.headers["retry-after"]) > 1
    wait_for(lambda: retries("queue_full") >= 1, 60, "spills counted")
    log.info("burst of 24: %d served, %d refused, %d spills to the other replica",
             codes.count(200), codes.count(503), retries("queue_full"))  # fmt: skip

    # -- a worker node lost with requests in flight, spread over both replicas by the router
    # (it counts a request's work from its choice: at once, 4 went to one replica before). The
    # survivor has room for all four (2 rows + 4 waiting) whatever the split.
    with ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(generate, base, s, 256) for s in range(200, 204)]
        wait_for(lambda: sum(map(sum, split(base))) == 4, 60, "the 4 requests admitted")
        held = split(base)  # (running, waiting) per replica; 256 steps take several seconds
        assert all(running + waiting for running, waiting in held), held
        cluster.remove_node(workers[0], allow_graceful=False)
        lost = time.monotonic()
        answers = [f.result() for f in in_flight]
    answered = time.monotonic() - lost
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    wait_for(lambda: retries("replica_lost") >= 1, 60, "retries after the node loss counted")
    again = [generate(base, s, 256) for s in (200, 201)]  # the seeds' images, from the survivor
    assert [r.content for r in again] == [r.content for r in answers[:2]]
    assert generate(base, 300, 8).status_code == 200  # new requests: the survivor serves
    log.info("node lost: the 4 in-flight requests (running, waiting per replica: %s) answered "
             "within %.1f s, %d retried on the survivor", held, answered,
             retries("replica_lost"))  # fmt: skip

    # -- capacity returns: a replica on the new node
    cluster.add_node(num_cpus=1, resources={"fake_gpu": 1})
    back = wait_for(lambda: replica_states(base).get("RUNNING") == 2, 240, "replica back")
    log.info("a node joined: 2 replicas running again after %.1f s", back)


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
