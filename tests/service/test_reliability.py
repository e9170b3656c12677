"""Reliability under abuse, against a real `marche serve` process on loopback (bounded):

* overload: twice the measured capacity for a while: only 200 and 503 answers, every 503
  with a sensible Retry-After, every accepted request answered, gauges back to 0 after;
* cancel storm: 100 clients hanging up at random moments on both endpoints: the counters
  add up, the engine loop stays alive, a normal request succeeds promptly after.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service.test_api import metric_value

STEPS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    env = os.environ | {"MARCHE_DEVICE": "cpu", "MARCHE_MAX_BATCH_SIZE": "4",
                        "MARCHE_QUEUE_SIZE": "8"}  # fmt: skip
    cmd = [
        sys.executable,
        "-c",
        "from marche.cli import main; main()",
        "serve",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(30)


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


def test_a_cancel_storm_leaves_the_counters_consistent_and_the_engine_alive(server):
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
    started = time.monotonic()
    r = httpx.post(server + "/generate", json=body(7), timeout=60)
    assert r.status_code == 200 and time.monotonic() - started < 20
    assert httpx.get(server + "/readyz", timeout=5).status_code == 200
