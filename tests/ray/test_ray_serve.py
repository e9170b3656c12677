"""Ray Serve: a local Ray on CPU, the app deployed from deploy/serve_config.yaml, one image."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port

pytest.importorskip("ray.serve")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ray_serve_deploys_from_the_config_file_and_generates_over_http(tmp_path):
    port = free_port()
    env = {**os.environ, "MARCHE_DEVICE": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
    log = (tmp_path / "serve.log").open("w")
    # `marche serve --ray` = `serve run deploy/serve_config.yaml` with our port, and the
    # engine's num_gpus set to 0 when there is no CUDA device (CPU fallback)
    server = subprocess.Popen(
        [sys.executable, "-m", "marche", "serve", "--ray", "--port", str(port),
         "--config", str(ROOT / "deploy" / "serve_config.yaml")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        r = httpx.post(f"{base}/generate", json={"class_id": 3, "seed": 0, "steps": 8}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.content.startswith(b"\x89PNG") and r.headers["x-seed"] == "0"
        bad = httpx.post(f"{base}/generate", json={"class_id": 42}, timeout=30)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "class_id"
        assert httpx.get(f"{base}/info", timeout=30).json()["model"] == "digits"
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                       capture_output=True, timeout=60)  # fmt: skip
        log.close()
