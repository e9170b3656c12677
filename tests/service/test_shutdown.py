"""SIGTERM under uvicorn: queued requests get 503 at once, the running one finishes, and the
process exits within the grace period (it used to finish every queued request first)."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.servers import serve


@pytest.mark.parametrize("policy", ["fifo", "fair"])
def test_sigterm_drains_the_queue_at_once_and_exits_within_the_grace_period(policy):
    """One row and no room for paused ones (fair: pause_rows 0): one request runs, three
    wait."""
    settings = {"scheduling_policy": policy, "pause_rows": "0"}
    with serve(max_batch_size="1", shutdown_grace_s="20", **settings) as (url, proc):
        body = {"class_id": 1, "steps": 256}  # seconds even at ~17 ms a step: still running
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(httpx.post, url + "/generate", json=body, timeout=60)
            time.sleep(0.5)
            queued = [pool.submit(httpx.post, url + "/generate", json=body, timeout=60)
                      for _ in range(3)]  # fmt: skip
            time.sleep(0.5)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            answers = [q.result() for q in queued]
            answered_in = time.monotonic() - signalled
            assert [a.status_code for a in answers] == [503] * 3
            assert all("shutting down" in a.json()["detail"] for a in answers)
            assert answered_in < 5  # not after the running request
            assert running.result().status_code == 200  # it had its grace period
        proc.wait(30)
        assert time.monotonic() - signalled < 25
