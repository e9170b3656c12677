"""SIGTERM under uvicorn: queued requests get 503 at once, the running one finishes, and the
process exits within the grace period (it used to finish every queued request first)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_the_queue_at_once_and_exits_within_the_grace_period():
    port = free_port()
    env = os.environ | {"MARCHE_DEVICE": "cpu", "MARCHE_MAX_BATCH_SIZE": "1",
                        "MARCHE_SHUTDOWN_GRACE_S": "20"}  # fmt: skip
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
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        body = {"class_id": 1, "steps": 48}
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
    finally:
        if proc.poll() is None:
            proc.kill()
