"""Reliability under abuse, against a real `marche serve` process on loopback (bounded):

* overload: twice the measured capacity for a while: only 200 and 503 answers, every 503
  with a sensible Retry-After, every accepted request answered, gauges back to 0 after;
* cancel storm: 100 clients hanging up at random moments on both endpoints: the counters
  add up, the engine loop stays alive, a normal request succeeds promptly after;
* soak: rounds of full batches and streams; the idle RSS after them stays within a stated
  bound of the ready server's (`MARCHE_SOAK_ROUNDS` rounds, at least 3; `make soak`: 20).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.servers import serve
from tests.service.test_api import metric_value

STEPS = 16
log = logging.getLogger("marche.reliability")  # numbers: pytest --log-cli-level=INFO


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve(max_batch_size="4", queue_size="8") as (url, _):
        yield url


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=10).text


def settle(url: str, timeout: float = 60) -> str:
    """/metrics once nothing runs or waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = metrics(url)
        busy = metric_value(text, "marche_requests_running") + metric_value(
            text, "marche_requests_waiting"
        )
        if busy == 0:
            return text
        time.sleep(0.2)
    raise AssertionError("the engine did not go idle")


def body(i: int) -> dict:
    return {"class_id": i % 10, "seed": i, "steps": STEPS}


def test_overload_is_shed_with_503s_and_every_accepted_request_is_answered(server):
    # capacity: a closed loop of 8 clients for 6 s
    done: list[float] = []
    stop = time.monotonic() + 6

    def closed(c: int) -> None:
        i = 0
        while time.monotonic() < stop:
            if httpx.post(server + "/generate", json=body(c * 100 + i), timeout=60).is_success:
                done.append(time.monotonic())
            i += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(closed, range(8)))
    capacity = max(len(done), 1) / 6
    before = settle(server)
    # open loop at 2x capacity for 8 s
    rng, answers, lock = random.Random(0), [], threading.Lock()

    def one(i: int) -> None:
        r = httpx.post(server + "/generate", json=body(10_000 + i), timeout=120)
        with lock:
            answers.append(r)

    with ThreadPoolExecutor(64) as pool:
        t, i, start = 0.0, 0, time.monotonic()
        while t < 8:
            t += rng.expovariate(2 * capacity)
            time.sleep(max(0.0, start + t - time.monotonic()))
            pool.submit(one, i)
            i += 1
    after = settle(server)
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503} and codes.count(503) > 0, sorted(set(codes))
    for r in answers:
        if r.status_code == 503:
            assert 1 <= int(r.headers["retry-after"]) <= 600
    served = metric_value(after, "marche_requests_total", status="200") - metric_value(
        before, "marche_requests_total", status="200"
    )
    assert served == codes.count(200)  # every accepted request was answered (and counted)
    shed = metric_value(after, "marche_rejections_total") - metric_value(
        before, "marche_rejections_total"
    )
    assert shed == codes.count(503)
    retry = [int(r.headers["retry-after"]) for r in answers if r.status_code == 503]
    log.info("overload: capacity %.2f req/s, %d requests at 2x, %d served, %d shed (503), "
             "Retry-After %d..%d s", capacity, len(codes), codes.count(200), codes.count(503),
             min(retry), max(retry))  # fmt: skip


@pytest.fixture(scope="module")
def roomy_server() -> Iterator[str]:
    """Room for the whole storm in the queue: its requests are accepted, then abandoned."""
    with serve(queue_size="128") as (url, _):
        yield url


def test_a_cancel_storm_leaves_the_counters_consistent_and_the_engine_alive(roomy_server):
    server = roomy_server
    before = settle(server)
    rng = random.Random(1)

    def hang_up(i: int) -> None:
        patience = rng.uniform(0.3, 3.0)  # long enough for the request to be read
        try:
            if i % 2:
                httpx.post(server + "/generate", json=body(i), timeout=patience)
            else:
                with httpx.stream("POST", server + "/generate/stream", json=body(i),
                                  timeout=60) as r:  # fmt: skip
                    end = time.monotonic() + patience
                    for _ in r.iter_lines():
                        if time.monotonic() > end:
                            break  # hang up mid-stream
        except httpx.HTTPError:
            pass  # the client's own timeout: it hung up

    with ThreadPoolExecutor(100) as pool:
        list(pool.map(hang_up, range(100)))
    after = settle(server)

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    outcomes = {s: delta("marche_requests_total", status=s) for s in ("200", "499", "503")}
    assert sum(outcomes.values()) == 100, outcomes  # every request ended exactly once
    # a client that went away is a 499; its job was either dropped (a cancellation) or had
    # just finished (its image was generated, never delivered): each accepted job is one of
    # the two, exactly once
    cancelled = delta("marche_cancellations_total", reason="disconnected")
    generated = delta("marche_images_generated_total")
    assert cancelled <= outcomes["499"]
    assert generated + cancelled == outcomes["200"] + outcomes["499"], (generated, cancelled)
    assert delta("marche_rejections_total") == outcomes["503"]
    log.info("cancel storm: %s; %d jobs cancelled, %d generated", outcomes, cancelled, generated)
    started = time.monotonic()
    r = httpx.post(server + "/generate", json=body(7), timeout=60)
    assert r.status_code == 200 and time.monotonic() - started < 20
    assert httpx.get(server + "/readyz", timeout=5).status_code == 200


SOAK_ROUNDS = max(3, int(os.environ.get("MARCHE_SOAK_ROUNDS", "3")))
# idle RSS after load <= ready RSS + this. Measured on a 2-core VM, 5 rounds: +17..+21 MB
# with the worker's idle heap trim (service/core/memory.py), +79..+101 MB without it; on CI's
# runner without it idle RSS rose 525 -> 626 MB in the third round (fragmented malloc
# arenas, not live objects: the trim gives it back)
SOAK_BOUND_MB = 150


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_soak_idle_memory_stays_within_its_bound():
    with serve() as (url, proc):
        ready = rss_mb(proc.pid)
        idle = []

        def batch(i: int) -> int:  # a full batch: 16 images
            job = {"class_id": i % 10, "seed": i, "steps": 16, "num_images": 16}
            return httpx.post(url + "/generate", json=job, timeout=300).status_code

        def stream(i: int) -> int:
            with httpx.stream("POST", url + "/generate/stream", json=body(i), timeout=300) as r:
                return sum(1 for _ in r.iter_lines()) and r.status_code

        for round_ in range(SOAK_ROUNDS):
            with ThreadPoolExecutor(16) as pool:
                codes = list(pool.map(batch, range(round_ * 4, round_ * 4 + 4)))
                codes += list(pool.map(stream, range(32)))
            assert set(codes) == {200}
            settle(url)
            time.sleep(3)  # the worker gives freed heap back 1 s after going idle
            idle.append(rss_mb(proc.pid))
    log.info("soak: ready %.0f MB, idle after each round %s MB", ready, [round(x) for x in idle])
    assert max(idle) <= ready + SOAK_BOUND_MB, (ready, idle)
    assert idle[-1] <= idle[1] + 48, idle  # after two rounds of warm-up, no growth
