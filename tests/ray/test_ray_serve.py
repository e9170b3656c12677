"""Ray Serve, end to end: `marche serve --ray` on CPU (a local Ray it owns), the app deployed
from deploy/serve_config.yaml, then what an operator would do to it:

* images and 422s over HTTP, the app's metrics on the metrics port asked for;
* the front door: an API key (401 without it, the key never logged), the official `openai`
  client on /v1 answering the image /generate gives, the web page;
* a queue-full burst: JSON 503s with Retry-After, counted, no ERROR traceback and no Serve
  deployment error per 503;
* the engine replica killed (SIGKILL) with a /generate and a stream in flight: the /generate
  is retried once (counted) and answers the same image its seed gives later, the stream that
  had sent events ends with an `error` event (a counted 500); Serve restarts the replica and
  the service recovers (the time is logged: pytest --log-cli-level=INFO);
* SIGTERM: Serve shuts down, then the Ray cluster; every Ray process it started is gone.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.servers import free_port, wait_for
from tests.service.test_api import metric_value

pytest.importorskip("ray.serve")
ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("marche.ray_test")
KEY = "sk-ray-test-key"


def ray_pids() -> set[int]:
    """Processes of any Ray cluster on this machine (by command line)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if any(word in cmdline for word in (b"raylet", b"gcs_server", b"ray::", b"ray/")):
                found.add(int(entry.name))
    return found - {os.getpid()}


def replica_pid(deployment: str) -> int:
    for pid in ray_pids():
        try:
            if (
                f"ServeReplica:marche:{deployment}".encode()
                in Path(f"/proc/{pid}/cmdline").read_bytes()
            ):
                return pid
        except OSError:
            pass
    raise AssertionError(f"no {deployment} replica process")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds Ray's processes in /proc")
def test_ray_serve_end_to_end(tmp_path):
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "MARCHE_DEVICE": "cpu", "MARCHE_QUEUE_SIZE": "1", "MARCHE_API_KEY": KEY,
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_metrics_report_interval_ms": "1000"}  # fmt: skip
    before = ray_pids()
    log_path = tmp_path / "serve.log"
    out = log_path.open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "marche", "serve", "--ray", "--port", str(port),
         "--metrics-port", str(metrics_port),
         "--config", str(ROOT / "deploy" / "serve_config.yaml")],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    api = httpx.Client(headers={"Authorization": f"Bearer {KEY}"})  # generation routes

    def ready() -> bool:
        assert server.poll() is None, log_path.read_text()[-3000:]
        try:
            return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def exported() -> str:
        return httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text

    def counted(status: str) -> float:
        return metric_value(exported(), "ray_marche_requests_total", status=status)

    try:
        wait_for(ready, 240, "ready")
        # -- images, validation, info, metrics on the port asked for
        r = api.post(f"{base}/generate", json={"class_id": 3, "seed": 0, "steps": 8}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.content.startswith(b"\x89PNG") and r.headers["x-seed"] == "0"
        bad = api.post(f"{base}/generate", json={"class_id": 42}, timeout=30)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "class_id"
        assert httpx.get(f"{base}/info", timeout=30).json()["model"] == "digits"

        # -- the front door under Ray: the key, the openai client, the page
        unkeyed = httpx.post(f"{base}/generate", json={"class_id": 3}, timeout=30)
        assert unkeyed.status_code == 401 and KEY not in unkeyed.text
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
        image = sdk.images.generate(
            prompt="three", size="32x32", extra_body={"seed": 0, "steps": 8}
        )
        assert base64.b64decode(image.data[0].b64_json) == r.content  # /generate's image
        assert image.data[0].revised_prompt == "3"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        page = httpx.get(f"{base}/", timeout=30)
        assert (
            page.status_code == 200
            and "default-src 'none'" in page.headers["content-security-policy"]
        )
        wait_for(lambda: counted("200") >= 1 and counted("422") >= 1, 60, "exported")

        # -- a queue-full burst (queue of 1): JSON 503s, counted, no traceback
        def generate(i: int) -> httpx.Response:
            job = {"class_id": i % 10, "seed": i, "steps": 32}
            return api.post(f"{base}/generate", json=job, timeout=120)

        # A readiness probe that timed out during a slow start-up is a cancelled request, which
        # Serve counts as a deployment error (seen on a loaded machine): only the burst counts.
        errors_before = metric_value(exported(), "ray_serve_deployment_error_counter_total")
        with ThreadPoolExecutor(8) as pool:
            burst = list(pool.map(generate, range(8)))
        codes = sorted(r.status_code for r in burst)
        refused = [r for r in burst if r.status_code == 503]
        assert set(codes) == {200, 503} and refused, codes
        for r in refused:
            assert "queue full" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
        wait_for(lambda: counted("503") == len(refused), 60, "503s exported")
        text = exported()
        errors = metric_value(text, "ray_serve_deployment_error_counter_total")
        assert errors == errors_before, "each 503 counted as a Serve deployment error"
        time.sleep(2)  # replica logs reach the driver's output within a second or so
        assert "QueueFull" not in log_path.read_text(), "a 503 logged a traceback"

        # -- the engine replica dies with a request and a stream in flight
        results: dict[str, object] = {}

        def post() -> None:
            job = {"class_id": 1, "seed": 1, "steps": 256}
            results["generate"] = api.post(f"{base}/generate", json=job, timeout=120)

        def stream() -> None:
            events: list[tuple[str, dict]] = []
            job = {"class_id": 2, "seed": 2, "steps": 256}
            with api.stream("POST", f"{base}/generate/stream", json=job, timeout=120) as r:
                name = ""
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        name = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        events.append((name, json.loads(line.removeprefix("data: "))))
                        if len(events) == 2:
                            results["streaming"] = True
            results["stream"] = events

        # one at a time: with a queue of 1, two requests arriving together could meet a 503
        threads = [threading.Thread(target=stream), threading.Thread(target=post)]
        threads[0].start()
        wait_for(lambda: "streaming" in results, 60, "the stream started")
        threads[1].start()
        time.sleep(0.5)  # admitted at the next step boundary; 256 steps take seconds
        os.kill(replica_pid("MarcheEngine"), signal.SIGKILL)
        killed = time.monotonic()
        for t in threads:
            t.join(60)
        answered = time.monotonic() - killed
        response = results["generate"]  # retried on the replica Serve started in its place
        assert isinstance(response, httpx.Response) and response.status_code == 200, response
        name, data = results["stream"][-1]
        assert name == "error" and data["status"] == 500 and "replica" in data["detail"]
        recovered = wait_for(ready, 180, "ready after the replica died") + answered
        job = {"class_id": 1, "seed": 1, "steps": 256}
        r = api.post(f"{base}/generate", json=job, timeout=120)
        assert r.status_code == 200, r.text
        assert r.content == response.content  # the retry gave the image its seed gives
        served = time.monotonic() - killed
        wait_for(lambda: counted("500") == 1, 60, "the stream's 500 exported")
        retries = metric_value(exported(), "ray_marche_engine_retries_total", reason="replica_lost")
        assert retries == 1
        log.info("replica killed: in-flight requests answered in %.1f s, /readyz 200 after "
                 "%.1f s, an image served after %.1f s", answered, recovered, served)  # fmt: skip

        assert KEY not in log_path.read_text()  # Serve's access logs never saw the key

        # -- SIGTERM: Serve, then Ray, and nothing left behind
        started = ray_pids() - before
        server.send_signal(signal.SIGTERM)
        server.wait(120)
        stopped = time.monotonic()
        assert server.returncode == 0, log_path.read_text()[-3000:]
        wait_for(lambda: not any(alive(p) for p in started), 60, "Ray processes gone")
        log.info("SIGTERM: Ray processes gone %.1f s after exit", time.monotonic() - stopped)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        for pid in ray_pids() - before:  # whatever is left (a failed run): don't leak it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.close()
