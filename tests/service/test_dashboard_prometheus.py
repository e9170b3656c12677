"""The Grafana dashboard against a real Prometheus (Debian's `prometheus`, installed by
`.ci/run`): `deploy/prometheus.yml` pointed at a running `marche serve`, a little traffic with
a burst of 503s, then every dashboard expression evaluated through Prometheus' HTTP API:
each parses, the uvicorn runtime's panels return data, and the burst shows in the rejection
and status panels (it did not while a labelled series first appeared at its final count)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.test_deploy_files import dashboard_queries
from tests.servers import free_port, serve

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus")


def expand(expr: str) -> str:
    """Grafana's variables for the uvicorn runtime: prefix marche, every model and mode."""
    return expr.replace("${ns}", "marche").replace("$model", ".*").replace("$mode", ".*")


def query(prom: str, expr: str) -> list:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_every_dashboard_expression_evaluates_and_a_503_burst_shows(tmp_path):
    with serve(max_batch_size="1", queue_size="1") as (app, _):
        config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
        config["global"]["scrape_interval"] = "1s"
        for job in config["scrape_configs"]:
            job.pop("scrape_interval", None)
            if job["job_name"] == "marche-app":
                job["static_configs"][0]["targets"] = [app.removeprefix("http://")]
        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        prom = f"http://127.0.0.1:{prom_port}"
        try:
            deadline = time.monotonic() + 60
            while not _up(prom, "marche-app"):
                assert time.monotonic() < deadline, "prometheus never scraped the app"
                time.sleep(0.5)
            time.sleep(2)  # a few samples of the series at 0
            for i in range(3):  # some successes, one streamed
                assert httpx.post(f"{app}/generate", json={"class_id": i, "steps": 8},
                                  timeout=60).status_code == 200  # fmt: skip
            with httpx.stream("POST", f"{app}/generate/stream",
                              json={"class_id": 1, "steps": 8}, timeout=60) as r:  # fmt: skip
                assert sum(1 for _ in r.iter_lines()) > 0
            httpx.post(f"{app}/generate", json={"class_id": 99}, timeout=10)  # a 422
            with ThreadPoolExecutor(12) as pool:  # the burst: 1 runs, 1 waits, the rest 503
                codes = list(pool.map(lambda i: httpx.post(
                    f"{app}/generate", json={"class_id": i % 10, "steps": 64}, timeout=120
                ).status_code, range(12)))  # fmt: skip
            assert codes.count(503) >= 5
            time.sleep(4)  # scraped after the burst
            dashboard = json.loads((ROOT / "deploy/grafana/dashboards/marche.json").read_text())
            empty = []
            for expr in dashboard_queries(dashboard):
                if expr.startswith("label_values"):
                    continue  # a Grafana variable query, not PromQL
                result = query(prom, expand(expr))  # parses and evaluates
                if "ray_" not in expr and not result:
                    empty.append(expr)
            assert not empty, empty  # every uvicorn-runtime panel has data
            rejected = query(prom, expand(
                'sum by (reason) (rate({__name__=~"${ns}_rejections(_total)?", '
                'model=~"$model"}[1m]))'))  # fmt: skip
            assert float(rejected[0]["value"][1]) > 0  # the burst shows
            by_status = query(prom, expand(
                'sum by (status) (rate({__name__=~"${ns}_requests(_total)?", '
                'model=~"$model", mode=~"$mode"}[1m]))'))  # fmt: skip
            rates = {r["metric"]["status"]: float(r["value"][1]) for r in by_status}
            assert rates["503"] > 0 and rates["422"] > 0 and rates["200"] > 0, rates
        finally:
            proc.terminate()
            proc.wait(30)


def _up(prom: str, job: str) -> bool:
    try:
        result = query(prom, f'up{{job="{job}"}}')
    except (httpx.HTTPError, ValueError, AssertionError):
        return False
    return bool(result) and result[0]["value"][1] == "1"
