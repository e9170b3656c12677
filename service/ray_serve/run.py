"""`marche serve --ray`: the application deployed on Ray, sized to the machine, served until
SIGTERM / SIGINT. Ray is a local cluster owned by this process, or, with RAY_ADDRESS set, a
cluster started elsewhere (`ray start --head`, as the Docker image does), sized by its GPUs.

How many engine replicas (one per GPU):
* `--replicas N`: exactly N, autoscaling off;
* otherwise the config's autoscaling (work-based, `WorkPolicy`) between its `min_replicas` and
  the smaller of its `max_replicas` and the visible GPUs, starting with all of them
  (`initial_replicas`); on a CPU-only machine one replica unless `--replicas` says more.
On CPU the replicas split the cores: each gets `cores // N` torch threads and as many Ray CPUs.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve

from service.ray_serve.app import IMPORT_PATH, application

log = logging.getLogger("marche.ray")


def default_config() -> Path:
    """The Serve config that ships with the package."""
    return Path(str(resources.files("service.ray_serve") / "serve_config.yaml"))


def load_config(path: Path) -> dict[str, Any]:
    """The Serve config at `path`; a missing or foreign one is one clear line (SystemExit)."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"marche serve --ray: no Serve config at {path}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"marche serve --ray: cannot read {path}: {exc}") from None
    apps = spec.get("applications") if isinstance(spec, dict) else None
    if not apps or len(apps) != 1 or apps[0].get("import_path", IMPORT_PATH) != IMPORT_PATH:
        raise SystemExit(f"{path}: marche serve --ray runs one application, {IMPORT_PATH}")
    return spec


def size_deployments(
    options: dict[str, dict[str, Any]], replicas: int | None, gpus: int, cores: int
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The deployments' options for this machine (the module's rules), and the environment
    variables their replicas need."""
    options = copy.deepcopy(options)
    engine = options.setdefault("MarcheEngine", {})
    actor = engine.setdefault("ray_actor_options", {})
    env: dict[str, str] = {}
    if replicas is not None:
        engine.pop("autoscaling_config", None)
        engine["num_replicas"] = replicas
    elif "autoscaling_config" in engine:
        scaling = engine["autoscaling_config"]
        top = max(1, min(scaling.get("max_replicas", 1), gpus or 1))
        scaling["max_replicas"] = top
        scaling["min_replicas"] = min(scaling.get("min_replicas", 1), top)
        scaling["initial_replicas"] = top
        engine.pop("num_replicas", None)
    if gpus == 0:  # CPU: no GPU to ask for; the replicas split the cores
        count = replicas or engine.get("autoscaling_config", {}).get("max_replicas", 1)
        threads = max(1, cores // max(1, count))
        actor.update(num_gpus=0, num_cpus=threads)
        options.setdefault("Ingress", {}).setdefault("ray_actor_options", {})["num_cpus"] = 0
        env["MARCHE_TORCH_THREADS"] = str(threads)
    return options, env


def run(
    config: Path | None, host: str, port: int, metrics_port: int = 8080,
    replicas: int | None = None,
) -> None:  # fmt: skip
    """Deploy `config` (default: the packaged one) on a local Ray cluster owned by this
    process, its metrics exporter on `metrics_port`; on SIGTERM or SIGINT shut Serve down
    (replicas drain, up to their graceful_shutdown_timeout_s), then the cluster. Nothing is
    written to disk."""
    import torch

    from service.settings import ServiceSettings

    replicas = replicas or ServiceSettings().replicas  # --replicas, else MARCHE_REPLICAS
    spec = load_config(config or default_config())
    (application_spec,) = spec["applications"]
    options = {
        d["name"]: {k: v for k, v in d.items() if k != "name"}
        for d in application_spec.get("deployments", [])
    }
    address = os.environ.get("RAY_ADDRESS")
    if address:  # a cluster of someone else's: its GPUs and CPUs, our variables passed along
        ray.init(address=address, namespace="serve")
        resources = ray.cluster_resources()
        gpus, cores = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    else:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        cores = os.cpu_count() or 1
    options, env = size_deployments(options, replicas, gpus, cores)
    os.environ.update(env)  # replicas of a local cluster inherit this environment
    if address:
        for deployment in options.values():  # ...replicas of an existing one get it this way
            runtime_env = deployment.setdefault("ray_actor_options", {}).setdefault(
                "runtime_env", {}
            )
            runtime_env.setdefault("env_vars", {}).update(env)
    else:
        ray.init(namespace="serve", _metrics_export_port=metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(
            proxy_location=spec.get("proxy_location"),
            http_options={**spec.get("http_options", {}), "host": host, "port": port},
        )
        serve.run(
            application(options),
            name=application_spec.get("name", "marche"),
            route_prefix=application_spec.get("route_prefix", "/"),
            blocking=False,
        )
        log.warning("serving on http://%s:%d, Ray metrics on :%d", host, port, metrics_port)
        stop.wait()
        log.warning("shutting down: Serve drains its replicas, then Ray stops")
        # The application first, while the proxy still runs: its replicas finish what they
        # accepted (up to graceful_shutdown_timeout_s) and the answers reach their clients.
        # serve.shutdown() alone stops the proxy at once and cuts those connections.
        serve.delete(application_spec.get("name", "marche"))
    finally:
        serve.shutdown()
        ray.shutdown()  # a cluster started elsewhere: only disconnects
