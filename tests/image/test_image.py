"""The built image on the CPU, checked from outside the container (`make image-test`).

The compose stack of a GPU node with its CPU override (deploy/compose.yml +
deploy/compose.cpu.yml) runs under podman-compose: `serve` (the image's default command: Ray
Serve) and Prometheus (a local image of Debian's package, `scripts/image.sh base`). Every
check talks to them as a user would, over the published ports or `podman exec`; the last one
stops the container with requests in flight. Skipped unless MARCHE_IMAGE names the built image
(the make target sets it), so `make test` never needs podman.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("MARCHE_IMAGE", "")
PROJECT = "marche"
COMPOSE = ["-f", str(ROOT / "deploy/compose.yml"), "-f", str(ROOT / "deploy/compose.cpu.yml")]
SERVE = f"{PROJECT}_serve_1"  # podman-compose's container names
URL, RAY_METRICS, PROMETHEUS = (
    "http://127.0.0.1:8000",
    "http://127.0.0.1:8080",
    "http://127.0.0.1:9090",
)
ENV = os.environ | {"CONTAINERS_CONF": str(ROOT / "deploy/podman/containers.conf")}
READY_S = 420  # Ray, Serve and the digits engine's warm-up on two cores, under podman

pytestmark = pytest.mark.skipif(
    not IMAGE or shutil.which("podman-compose") is None,
    reason="set MARCHE_IMAGE to a built image (make image-test); needs podman-compose",
)


def run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=ENV, capture_output=True, text=True, check=check,
                          timeout=timeout)  # fmt: skip


def compose(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run("podman-compose", "-p", PROJECT, *COMPOSE, *args, **kwargs)


def compose_file() -> dict:
    return yaml.safe_load((ROOT / "deploy/compose.yml").read_text())


def wait_for(what: str, probe, timeout: float, every: float = 2.0):
    """Polls `probe()` until it returns something truthy; fails naming `what`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        time.sleep(every)
    logs = run("podman", "logs", "--tail", "60", SERVE, check=False)
    pytest.fail(f"{what}: not within {timeout:.0f} s (last: {last!r})\n{logs.stdout}{logs.stderr}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[None]:
    """serve + prometheus from the compose files, up until /readyz answers 200."""
    models = tmp_path_factory.mktemp("models")  # the read-only /models mount
    ENV["MARCHE_MODELS_DIR"] = str(models)
    compose("down", "-v", check=False)
    run("podman", "network", "rm", "-f", f"{PROJECT}_default", check=False)  # made anew, with DNS
    up = compose("up", "-d", "serve", "prometheus", check=False)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        wait_for("/readyz 200", lambda: httpx.get(f"{URL}/readyz", timeout=5).status_code == 200,
                 READY_S, every=5)  # fmt: skip
        yield
    finally:
        compose("down", "-v", check=False, timeout=180)


def generate(body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{URL}/generate", json=body, timeout=timeout)


def test_ready_and_generates_a_png_by_class_name(stack):
    assert httpx.get(f"{URL}/readyz", timeout=5).status_code == 200
    r = generate({"class_name": "seven", "seed": 0, "steps": 8})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG\r\n\x1a\n")


def test_the_openai_route_answers_the_official_client(stack):
    from openai import OpenAI

    client = OpenAI(base_url=f"{URL}/v1", api_key="unused", timeout=120)
    img = client.images.generate(
        model="digits",
        prompt="three",
        n=1,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 1, "steps": 8},
    )
    assert base64.b64decode(img.data[0].b64_json).startswith(b"\x89PNG")


def test_the_web_page_loads_with_its_assets(stack):
    page = httpx.get(f"{URL}/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assets = [a for a in ("/static/app.js", "/static/app.css") if a in page.text]
    assert assets, "the page names its script and style"
    for asset in assets:
        assert httpx.get(f"{URL}{asset}", timeout=10).status_code == 200, asset


def test_metrics_ray_exporter_and_app_route(stack):
    """Ray's exporter carries the app's series (ray_marche_*) and Serve's; the app's /metrics
    under Ray Serve answers, pointing at them (docs/SERVING.md, metrics)."""
    generate({"class_id": 4, "seed": 2, "steps": 8})

    def exported() -> str | None:
        text = httpx.get(RAY_METRICS, timeout=10).text
        wanted = ("ray_marche_requests_total", "ray_marche_images_generated_total",
                  "ray_marche_request_latency_seconds_bucket", "ray_serve_")  # fmt: skip
        return text if all(name in text for name in wanted) else None

    wait_for("the documented series on :8080", exported, 90, every=5)
    app = httpx.get(f"{URL}/metrics", timeout=10)
    assert app.status_code == 200 and "ray_marche" in app.text


def test_the_compose_health_check_passes_inside_the_container(stack):
    """The compose file's check, run in the container as Docker runs it, and the image's own
    HEALTHCHECK is the same command. (podman-compose 1.0.3 mangles a CMD-form check into
    `sh -c 'python' '-c' ...`, so its own health status is not the image's to answer for.)"""
    test = compose_file()["services"]["serve"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert run("podman", "exec", SERVE, *test[1:], check=False).returncode == 0
    own = run("podman", "image", "inspect", IMAGE, "--format", "{{json .Config.Healthcheck}}")
    assert json.loads(own.stdout)["Test"] == test


def test_the_container_runs_as_the_non_root_user(stack):
    assert run("podman", "exec", SERVE, "id", "-u").stdout.strip() == "1000"
    user = run("podman", "image", "inspect", IMAGE, "--format", "{{.Config.User}}").stdout
    assert user.strip() == "marche"
    processes = run("podman", "top", SERVE, "user", "args").stdout.splitlines()[1:]
    assert processes and not [p for p in processes if p.split()[0] in {"root", "0"}
                              and "catatonit" not in p], processes  # fmt: skip


def test_prometheus_scrapes_both_targets_and_answers_a_dashboard_query(stack):
    def targets_up() -> dict | None:
        active = httpx.get(f"{PROMETHEUS}/api/v1/targets", timeout=10).json()["data"]
        health = {t["labels"]["job"]: t["health"] for t in active["activeTargets"]}
        return health if health.get("ray") == health.get("marche-app") == "up" else None

    wait_for("the ray and marche-app jobs up", targets_up, 120, every=5)
    generate({"class_id": 2, "seed": 3, "steps": 8})
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/marche.json").read_text())
    titled = {p.get("title", "").lower(): p for p in dashboard["panels"]}
    panel = next(p for title, p in titled.items() if title.startswith("requests"))
    expr = panel["targets"][0]["expr"]  # the request rate
    query = expr.replace("${ns}", "ray_marche").replace("$model", ".*").replace("$mode", ".*")

    def answered() -> float | None:
        r = httpx.get(f"{PROMETHEUS}/api/v1/query", params={"query": query}, timeout=10).json()
        values = [float(s["value"][1]) for s in r["data"]["result"]]
        return sum(values) if values and sum(values) > 0 else None

    wait_for(f"data for {query!r}", answered, 120, every=5)


def test_a_stop_with_requests_in_flight_answers_them_all(stack):
    """`podman stop` (SIGTERM, then the compose file's stop_grace_period) while requests are
    decoding: every one is answered with its image, and the container exits in time."""
    grace = compose_file()["services"]["serve"]["stop_grace_period"]
    grace_s = int(grace.rstrip("s"))
    bodies = [{"class_id": i % 10, "seed": i, "steps": 128} for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(generate, body, 300) for body in bodies]
        wait_for("the requests running", lambda: httpx.get(f"{URL}/info", timeout=5).json()
                 .get("running", 0) > 0, 60, every=0.5)  # fmt: skip
        started = time.monotonic()
        stop = run("podman", "stop", "-t", str(grace_s), SERVE, check=False, timeout=grace_s + 60)
        stopped_s = time.monotonic() - started
        answers = [f.result() for f in futures]
    assert stop.returncode == 0, stop.stderr
    assert [a.status_code for a in answers] == [200] * len(bodies)
    assert all(a.content.startswith(b"\x89PNG") for a in answers)
    assert stopped_s < grace_s, f"stopped in {stopped_s:.1f} s, grace {grace_s} s"
    state = run("podman", "inspect", SERVE, "--format", "{{.State.ExitCode}}").stdout.strip()
    assert state == "0"
