"""Static checks of deploy/: every file parses and the pieces refer to each other correctly.

Nothing here runs Docker, Prometheus, Grafana or Kubernetes; it catches what breaks a stack
silently: a scrape target that is not a compose service, a dashboard querying a metric the
service never exports, a datasource uid or a mount path that does not match, a RayService
drifting from deploy/serve_config.yaml, a torch pin differing from the Makefile's.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yml"
PROMETHEUS = DEPLOY / "prometheus.yml"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "marche.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "marche.json"
RAYSERVICE = DEPLOY / "kuberay" / "rayservice.yaml"
SERVE_CONFIG = DEPLOY / "serve_config.yaml"
START_SCRIPT = DEPLOY / "start-ray-serve.sh"
DOCKERFILE = ROOT / "Dockerfile"

# The service's metrics contract (names as prometheus-client writes them under uvicorn; Ray
# Serve exports the same with a `ray_` prefix).
CONTRACT_METRICS = {
    "marche_request_latency_seconds": "histogram",
    "marche_queue_wait_seconds": "histogram",
    "marche_tenant_queue_wait_seconds": "histogram",
    "marche_step_latency_seconds": "histogram",
    "marche_batch_size": "histogram",
    "marche_step_rows": "histogram",
    "marche_active_token_fraction": "histogram",
    "marche_admissions_total": "counter",
    "marche_requests_total": "counter",
    "marche_images_generated_total": "counter",
    "marche_rejections_total": "counter",
    "marche_cancellations_total": "counter",
    "marche_engine_retries_total": "counter",
    "marche_outstanding_image_steps": "gauge",
    "marche_expected_wait_seconds": "gauge",
    "marche_requests_running": "gauge",
    "marche_requests_waiting": "gauge",
    # exact sums of the histograms with mean panels (Ray rebuilds a histogram's _sum)
    "marche_batch_size_observed_sum_total": "counter",
    "marche_step_rows_observed_sum_total": "counter",
    "marche_active_token_fraction_observed_sum_total": "counter",
}
# Ray built-ins the dashboard may use (Ray 2.60: ray/serve/_private/request_ingress_metrics.py,
# router.py, ray/dashboard/modules/reporter/reporter_agent.py).
RAY_BUILTINS = {
    "ray_serve_num_http_requests_total": "counter",
    "ray_serve_http_request_latency_ms": "histogram",
    "ray_serve_deployment_queued_queries": "gauge",
    "ray_serve_deployment_replica_healthy": "gauge",
    "ray_serve_autoscaling_desired_replicas": "gauge",
    "ray_serve_autoscaling_target_replicas": "gauge",
    "ray_node_gpus_utilization": "gauge",
    "ray_node_gram_used": "gauge",
    "ray_node_gram_available": "gauge",
    "ray_component_rss_mb": "gauge",
}
CONTRACT_ENV = {
    "MARCHE_MODEL",
    "MARCHE_CHECKPOINT",
    "MARCHE_VAE",
    "MARCHE_DEVICE",
    "MARCHE_DTYPE",
    "MARCHE_MAX_BATCH_SIZE",
    "MARCHE_MAX_WAIT_MS",
    "MARCHE_QUEUE_SIZE",
    "MARCHE_REQUEST_TIMEOUT_S",
    "MARCHE_DEFAULT_MODE",
    "MARCHE_RANDOM_WEIGHTS",
    "MARCHE_REPLICAS",
    "MARCHE_API_KEY",
}
HUB_ENV = {"MARCHE_CACHE"}  # read by engine.hub (where fetched weights live), not a setting
IMPORT_PATH = "service.ray_serve.app:app"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return load_yaml(RAYSERVICE)


@pytest.fixture(scope="module")
def serve_config_v2(rayservice) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host source of a service's short-syntax bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = env_default_in(volume).split(":")[:2]
        mounts[target] = source
    return mounts


def published_container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(port).split(":")[-1].split("/")[0]) for port in service.get("ports", [])}


def env_default(value: str) -> str:
    """`${VAR:-default}` -> default; anything else unchanged."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    return match.group(1) if match else value


def env_default_in(text: str) -> str:
    """Every `${VAR:-default}` in text replaced by its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


# -- every file parses ----------------------------------------------------------------------


def test_deploy_tree_has_the_expected_files():
    for path in (COMPOSE, PROMETHEUS, DATASOURCE, PROVIDER, DASHBOARD, RAYSERVICE, START_SCRIPT):
        assert path.is_file(), path


@pytest.mark.parametrize(
    "path",
    sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml", ".json"}),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_yaml_and_json_file_parses(path: Path):
    if path.suffix == ".json":
        assert isinstance(json.loads(path.read_text()), dict)
    else:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert documents and all(isinstance(d, dict) for d in documents)


# -- compose --------------------------------------------------------------------------------


def test_compose_has_the_stack(services):
    assert {"serve", "prometheus", "grafana"} <= set(services)
    assert services["locust"]["profiles"] == ["loadtest"]
    for name in ("serve", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must start by default"


def test_compose_builds_the_root_dockerfile(services):
    build = services["serve"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).is_file()


def test_compose_reserves_every_nvidia_gpu(services):
    """One engine replica per visible GPU (the start script sizes the engine to them)."""
    devices = services["serve"]["deploy"]["resources"]["reservations"]["devices"]
    gpus = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d["capabilities"]]
    assert len(gpus) == 1 and gpus[0]["count"] == "all"


def test_compose_serve_runtime_settings(services):
    serve = services["serve"]
    assert published_container_ports(serve) >= {8000, 8080, 8265}
    assert serve["shm_size"] == "10gb"
    assert serve["stop_grace_period"] == "60s"
    assert serve.get("init") is True  # reaps Ray's daemons, forwards SIGTERM
    assert bind_mounts(serve)["/models"] and serve["volumes"][0].endswith(":/models:ro")


def test_compose_healthcheck_polls_readyz_without_curl(services):
    check = services["serve"]["healthcheck"]
    command = " ".join(check["test"])
    assert check["test"][0] == "CMD" and check["test"][1] == "python"
    assert "http://localhost:8000/readyz" in command
    assert "curl" not in command and "urllib" in command


def test_compose_env_uses_contract_settings(services):
    env = services["serve"]["environment"]
    names = {k for k in env if k.startswith("MARCHE_")}
    assert names <= CONTRACT_ENV | HUB_ENV, names - CONTRACT_ENV - HUB_ENV
    # the models volume is the weight cache: `marche weights fetch` fills it on the host
    hub = pytest.importorskip("engine.hub")
    assert str(hub.cache_dir({"MARCHE_CACHE": env["MARCHE_CACHE"]})) == "/models"
    assert any(v.endswith(":/models:ro") for v in services["serve"]["volumes"])
    assert env["MARCHE_API_KEY"] is None  # passed through from the shell, never a default
    assert env_default(env["MARCHE_MODEL"]) == "digits"
    # no checkpoint by default: unset (None), never an empty string
    assert env["MARCHE_CHECKPOINT"] is None and env["MARCHE_VAE"] is None


def test_compose_env_names_are_service_settings():
    settings = pytest.importorskip("service.settings")
    fields = set(settings.ServiceSettings.model_fields)
    for name in CONTRACT_ENV:
        assert name.removeprefix("MARCHE_").lower() in fields, name


def test_compose_bind_mount_sources_exist(services):
    expected = {
        ("prometheus", "/etc/prometheus/prometheus.yml"): PROMETHEUS,
        ("grafana", "/etc/grafana/provisioning"): DEPLOY / "grafana" / "provisioning",
        ("grafana", "/var/lib/grafana/dashboards"): DEPLOY / "grafana" / "dashboards",
        ("locust", "/mnt/loadtest"): ROOT / "loadtest",
    }
    for (service, target), path in expected.items():
        source = bind_mounts(services[service])[target]
        assert (COMPOSE.parent / source).resolve() == path.resolve(), (service, target)
        assert path.exists(), path


def test_compose_locust_runs_the_locustfile_headless_against_serve(services):
    locust = services["locust"]
    argv = locust["entrypoint"] + locust["command"]
    assert argv[:3] == ["locust", "-f", "/mnt/loadtest/locustfile.py"]
    assert "--headless" in argv
    assert argv[argv.index("--host") + 1] == "http://serve:8000"
    assert locust["depends_on"]["serve"]["condition"] == "service_healthy"


def test_compose_grafana_is_provisioned_and_anonymous(services):
    grafana = services["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    dashboards_dir = bind_mounts(grafana)[str(home.parent)]
    assert (COMPOSE.parent / dashboards_dir / home.name).resolve() == DASHBOARD.resolve()
    assert "prometheus" in grafana["depends_on"]
    assert "serve" in services["prometheus"]["depends_on"]


# -- Prometheus -----------------------------------------------------------------------------


def scrape_jobs() -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in load_yaml(PROMETHEUS)["scrape_configs"]}


def job_targets(job: dict[str, Any]) -> list[str]:
    return [t for sc in job["static_configs"] for t in sc["targets"]]


def test_prometheus_targets_are_compose_services(services):
    for name, job in scrape_jobs().items():
        for target in job_targets(job):
            host, port = target.rsplit(":", 1)
            if host == "localhost":
                assert name == "prometheus"
                continue
            assert host in services, f"{name}: {target} is not a compose service"
            assert int(port) in published_container_ports(services[host]), target


def test_prometheus_scrapes_ray_exporter_and_app_metrics():
    jobs = scrape_jobs()
    assert job_targets(jobs["ray"]) == ["serve:8080"]
    assert jobs["ray"].get("scrape_interval", "5s") == "5s"
    assert job_targets(jobs["marche-app"]) == ["serve:8000"]
    assert jobs["marche-app"]["metrics_path"] == "/metrics"
    assert load_yaml(PROMETHEUS)["global"]["scrape_interval"] == "5s"


def test_ray_metrics_port_matches_the_start_script():
    script = START_SCRIPT.read_text()
    assert "${RAY_METRICS_EXPORT_PORT:-8080}" in script
    assert "--metrics-export-port=" in script


# -- Grafana --------------------------------------------------------------------------------


def datasource() -> dict[str, Any]:
    (source,) = load_yaml(DATASOURCE)["datasources"]
    return source


def test_datasource_points_at_compose_prometheus(services):
    source = datasource()
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    host, port = source["url"].removeprefix("http://").split(":")
    assert host in services and int(port) in published_container_ports(services[host])


def walk_datasources(node: Any):
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            yield node["datasource"]
        for value in node.values():
            yield from walk_datasources(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_datasources(value)


def test_dashboard_uses_the_provisioned_datasource_uid(dashboard):
    refs = [r for r in walk_datasources(dashboard) if r.get("type") == "prometheus"]
    assert refs
    assert {r["uid"] for r in refs} == {datasource()["uid"]}


def test_dashboard_provider_path_matches_compose_mount(services):
    (provider,) = load_yaml(PROVIDER)["providers"]
    path = provider["options"]["path"]
    mounts = bind_mounts(services["grafana"])
    assert (COMPOSE.parent / mounts[path]).resolve() == DASHBOARD.parent.resolve()
    provisioning = (COMPOSE.parent / mounts["/etc/grafana/provisioning"]).resolve()
    assert DATASOURCE.resolve().is_relative_to(provisioning)
    assert PROVIDER.resolve().is_relative_to(provisioning)


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_dashboard_structure(dashboard):
    assert dashboard["uid"] == "marche"
    assert 36 <= dashboard["schemaVersion"] <= 41
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ns = variables["ns"]
    assert ns["type"] == "custom"
    assert [o["value"] for o in ns["options"]] == ["ray_marche", "marche"]
    assert ns["current"]["value"] == "ray_marche"


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def metric_names(expr: str, ns: str = "marche") -> set[str]:
    """Metric names a PromQL expression reads; `{__name__=~"x(_total)?"}` counts as `x`."""
    expr = expr.replace("${ns}", ns).replace("$ns", ns)
    names = set()
    for pattern in re.findall(r'__name__=~"([^"]*)"', expr):
        name = pattern.replace("(_total)?", "")
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name), pattern
        names.add(name)
    bare = re.sub(r'"[^"]*"', '""', expr)  # label values are not metric names
    names.update(re.findall(r"\b((?:marche|ray)_[a-zA-Z0-9_:]*)", bare))
    return names


def resolve(name: str, known: dict[str, str]) -> str | None:
    """The known metric a series name belongs to (histogram suffixes, optional `_total`)."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and known.get(base) == "histogram":
            return base
    if known.get(name) == "gauge":
        return name
    counter = name if name.endswith("_total") else name + "_total"
    if known.get(counter) == "counter":
        return counter
    return None


def test_metric_name_parser():
    expr = (
        'sum by (status) (rate({__name__=~"${ns}_requests(_total)?", model=~"$model"}[1m])) '
        '/ sum(rate(${ns}_batch_size_bucket{mode="marche"}[1m]))'
    )
    assert metric_names(expr) == {"marche_requests", "marche_batch_size_bucket"}
    assert resolve("marche_requests", CONTRACT_METRICS) == "marche_requests_total"
    assert resolve("marche_batch_size_bucket", CONTRACT_METRICS) == "marche_batch_size"
    assert resolve("marche_batch_size", CONTRACT_METRICS) is None  # a histogram needs a suffix
    assert resolve("marche_request_running", CONTRACT_METRICS) is None


def dashboard_metrics(dashboard: dict[str, Any]) -> set[str]:
    return {name for expr in dashboard_queries(dashboard) for name in metric_names(expr)}


def test_dashboard_metrics_are_contract_or_ray_builtins(dashboard):
    unknown = sorted(
        name
        for name in dashboard_metrics(dashboard)
        if resolve(name, CONTRACT_METRICS if name.startswith("marche_") else RAY_BUILTINS) is None
    )
    assert not unknown, f"not in the metrics contract nor a Ray built-in: {unknown}"


def test_dashboard_charts_every_contract_metric(dashboard):
    used = {resolve(name, CONTRACT_METRICS) for name in dashboard_metrics(dashboard)}
    assert set(CONTRACT_METRICS) <= used, set(CONTRACT_METRICS) - used


def test_dashboard_uses_the_ns_variable_for_service_metrics(dashboard):
    for expr in dashboard_queries(dashboard):
        assert "marche_" not in expr, f"hard-coded prefix instead of ${{ns}}: {expr}"


def test_dashboard_tolerates_counters_without_total(dashboard):
    # ray#59072: some Ray versions export counters without `_total`
    for expr in dashboard_queries(dashboard):
        for name in re.findall(r"\$\{ns\}_\w+|ray_\w+", expr):
            assert not name.endswith("_total"), f'use {{__name__=~"x(_total)?"}}: {expr}'


def test_contract_matches_service_metrics():
    metrics = pytest.importorskip("service.metrics")
    assert {n.removesuffix("_total") for n in metrics.METRIC_NAMES} == {
        n.removesuffix("_total") for n in CONTRACT_METRICS
    }
    specs = getattr(metrics, "SPECS", ())
    for spec in specs:
        assert CONTRACT_METRICS[spec.name] == spec.kind, spec.name


def test_dashboard_metrics_are_exported_by_the_service(dashboard):
    metrics = pytest.importorskip("service.metrics")
    names = set(metrics.METRIC_NAMES)

    def exported(name: str) -> bool:
        bases = {name.removesuffix(s) for s in ("_bucket", "_sum", "_count", "_total")}
        return bool(({name, name + "_total"} | bases) & names)

    missing = sorted(
        n for n in dashboard_metrics(dashboard) if n.startswith("marche_") and not exported(n)
    )
    assert not missing, f"dashboard reads metrics service.metrics does not define: {missing}"


def test_dashboard_series_exist_in_the_uvicorn_exposition(dashboard):
    """With ns=marche every service series the dashboard reads is in a real /metrics text."""
    metrics = pytest.importorskip("service.metrics")
    if not all(hasattr(metrics, a) for a in ("SPECS", "PrometheusBackend")):
        pytest.skip("service.metrics has no SPECS/PrometheusBackend")
    backend = metrics.PrometheusBackend()
    for spec in metrics.SPECS:
        child = backend.make(spec).labels(**{label: "x" for label in spec.labels})
        getattr(child, {"histogram": "observe", "counter": "inc", "gauge": "set"}[spec.kind])(1)
    exposed = {
        line.split("{")[0].split()[0]
        for line in backend.render().decode().splitlines()
        if line and not line.startswith("#")
    }
    for name in dashboard_metrics(dashboard):
        if name.startswith("marche_"):
            assert {name, name + "_total"} & exposed, name


# -- KubeRay --------------------------------------------------------------------------------


def ray_pin() -> str:
    pyproject = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"ray\[serve\]==([\d.]+)"', pyproject).group(1)


def deployments(app: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in app["deployments"]}


def test_rayservice_runs_the_application(rayservice, serve_config_v2):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    (app,) = serve_config_v2["applications"]
    assert app["import_path"] == IMPORT_PATH and app["route_prefix"] == "/"
    deps = deployments(app)
    assert set(deps) == {"Ingress", "MarcheEngine"}
    assert deps["MarcheEngine"]["ray_actor_options"]["num_gpus"] == 1
    assert deps["Ingress"]["ray_actor_options"].get("num_gpus", 0) == 0
    assert serve_config_v2["http_options"]["port"] == 8000


def test_rayservice_cluster_shape(rayservice, serve_config_v2):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray_pin()
    head = cluster["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    assert head["rayStartParams"]["metrics-export-port"] == "8080"
    assert {"name": "metrics", "containerPort": 8080} in head_container["ports"]
    (gpu_group,) = [
        g
        for g in cluster["workerGroupSpecs"]
        if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    ]
    worker = gpu_group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_group["replicas"] >= 2 and gpu_group["minReplicas"] <= gpu_group["replicas"]
    assert {"name": "metrics", "containerPort": 8080} in worker["ports"]
    engine = deployments(serve_config_v2["applications"][0])["MarcheEngine"]
    scaling = engine["autoscaling_config"]  # Serve scales replicas by work, Ray adds GPU pods
    assert "num_replicas" not in engine and cluster["enableInTreeAutoscaling"] is True
    assert scaling["policy"]["policy_function"] == "service.ray_serve.autoscaling:WorkPolicy"
    assert scaling["min_replicas"] == gpu_group["minReplicas"] <= gpu_group["replicas"]
    assert scaling["max_replicas"] == gpu_group["maxReplicas"]
    for container in (head_container, worker):
        assert container["image"] == "marche-serve:latest"
        names = {e["name"] for e in container.get("env", []) if e["name"].startswith("MARCHE_")}
        assert names <= CONTRACT_ENV | HUB_ENV, names - CONTRACT_ENV - HUB_ENV


# Options that legitimately differ between one node (compose) and a cluster.
SIZING = {"num_replicas", "max_replicas_per_node", "ray_actor_options", "autoscaling_config"}


def test_rayservice_stays_in_sync_with_serve_config(serve_config_v2):
    if not SERVE_CONFIG.is_file():
        pytest.skip("deploy/serve_config.yaml not written yet")
    single = load_yaml(SERVE_CONFIG)
    assert serve_config_v2["http_options"] == single["http_options"]
    (app,), (cluster_app,) = single["applications"], serve_config_v2["applications"]
    for key in ("name", "import_path", "route_prefix"):
        assert cluster_app[key] == app[key], key
    assert app["import_path"] == IMPORT_PATH
    single_deps, cluster_deps = deployments(app), deployments(cluster_app)
    assert set(single_deps) == set(cluster_deps)
    for name, dep in single_deps.items():
        other = cluster_deps[name]
        for key in (set(dep) | set(other)) - SIZING:
            assert other.get(key) == dep.get(key), f"{name}.{key}"
        gpus = dep.get("ray_actor_options", {}).get("num_gpus", 0)
        assert other.get("ray_actor_options", {}).get("num_gpus", 0) == gpus, name


# -- Dockerfile and entry script ------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_pins_torch_like_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"^TORCH\s*:=\s*(\S+)", makefile, re.M).group(1)
    specs = re.findall(r'ARG TORCH_SPEC="([^"]+)"', DOCKERFILE.read_text())
    assert specs == [pin]


def test_dockerfile_installs_ray_extras_and_runs_the_ray_stack():
    instructions = dockerfile_instructions()
    runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
    assert 'pip install ".[ray]"' in runs
    exposed = {p for kw, rest in instructions if kw == "EXPOSE" for p in rest.split()}
    assert exposed == {"8000", "8080", "8265"}
    # No ENTRYPOINT: `docker run IMAGE marche serve` replaces the default command.
    assert "ENTRYPOINT" not in {kw for kw, _ in instructions}
    (cmd,) = [json.loads(rest) for kw, rest in instructions if kw == "CMD"]
    assert cmd == ["sh", "/app/deploy/start-ray-serve.sh"]
    assert ("COPY", "deploy ./deploy") in instructions
    assert ("WORKDIR", "/app") in instructions
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1] not in {"root", "0"}


def test_start_script_starts_ray_then_marche_serve_on_it():
    script = START_SCRIPT.read_text()
    ray_start = script.index("ray start --head")
    serve_run = script.index('RAY_ADDRESS=127.0.0.1:6379 marche serve --ray --config "${config}"')
    assert "--port=6379" in script[ray_start:serve_run]
    assert ray_start < serve_run
    for flag in ("--dashboard-host=0.0.0.0", "--disable-usage-stats", "--metrics-export-port"):
        assert flag in script[ray_start:serve_run], flag
    default = re.search(r"MARCHE_SERVE_CONFIG:-/app/([^}]+)\}", script).group(1)
    assert (ROOT / default).resolve() == SERVE_CONFIG.resolve()
    assert "trap stop TERM INT" in script


def test_start_script_is_valid_sh():
    result = subprocess.run(["sh", "-n", str(START_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def dashboard_exprs(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr":
                yield value
            else:
                yield from dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_exprs(item)


def test_dashboard_mode_variable_lists_every_engine_mode(dashboard):
    from engine.decode.policy import MODES

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    mode = variables["mode"]
    assert mode["query"].split(",") == list(MODES) and mode["includeAll"]
    assert [o["value"] for o in mode["options"]] == ["$__all", *MODES]


def test_every_mode_labelled_series_is_filtered_by_the_mode_variable(dashboard):
    from service.metrics import SPECS

    with_mode = {s.name.removeprefix("marche_").removesuffix("_total") for s in SPECS
                 if "mode" in s.labels}  # fmt: skip
    checked = 0
    for expr in dashboard_exprs(dashboard["panels"]):
        for selector in re.findall(r"[\w${}]*\{(?:[^{}]|\$\{ns\})*\}", expr):
            found = re.search(
                r"\$\{ns\}_([a-z_]+?)(_bucket|_sum|_count|_observed_sum)?(\(_total\)\?)?[\"{]",
                selector,
            )
            if found and found.group(1) in with_mode:
                assert 'mode=~"$mode"' in selector, selector
                checked += 1
    assert checked >= 15
