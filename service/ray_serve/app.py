"""Ray Serve runtime: an HTTP ingress deployment and a GPU engine deployment (the only Ray import).

    marche serve --ray                        # this module's `run`: a local Ray it owns
    serve run deploy/serve_config.yaml        # or Serve's CLI, in a cluster started elsewhere

`Ingress` (CPU) runs the same FastAPI app as uvicorn, built by `build_app` with a client that
calls `MarcheEngine` through a deployment handle. `MarcheEngine` (one per GPU) owns the model
and an `EngineWorker` with its own scheduler rather than `@serve.batch`: rows join and leave the
running batch between decoding steps (a `@serve.batch` batch cannot shed members once running)
and streaming gets per-step progress. Its batch knobs change at runtime through `user_config`.

Expected refusals (queue full, deadline, a failed step) cross the handle as a `Failure` value,
not an exception: Ray would log each as an ERROR traceback and count it as a deployment error.
A replica that dies mid-request surfaces as a Ray error, which the ingress answers as a JSON 500
(a stream: an `error` event), counted like any other.

Metrics use `ray.serve.metrics`, exported by Ray's per-node exporter as `ray_marche_*`.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve
from ray.exceptions import RayError
from ray.serve import metrics as ray_metrics
from ray.serve.handle import DeploymentHandle

from engine.decode.policy import MODES
from service.core.client import EngineRequest, LocalEngineClient
from service.core.jobs import EngineError, JobCancelled, JobResult, QueueFull
from service.http.app import build_app
from service.metrics import Metrics, MetricSpec
from service.settings import ServiceSettings

log = logging.getLogger("marche.ray")
IMPORT_PATH = "service.ray_serve.app:app"  # the Serve application (deploy/serve_config.yaml)
EXPECTED = (QueueFull, JobCancelled, EngineError)  # outcomes the app answers (503/504/499/500)


class _Tagged:
    def __init__(self, metric: Any, tags: dict[str, str]) -> None:
        self.metric, self.tags = metric, tags

    def observe(self, value: float) -> None:
        self.metric.observe(value, tags=self.tags)

    def inc(self, value: float = 1.0) -> None:
        if value == 0:  # create the series at 0: Counter.inc refuses 0, its recorder does
            self.metric._record(0, tags=self.tags)  # not (checked against Ray's exporter)
            return
        self.metric.inc(value, tags=self.tags)

    def set(self, value: float) -> None:
        self.metric.set(value, tags=self.tags)


class _RayMetric:
    def __init__(self, spec: MetricSpec) -> None:
        name = spec.name.removesuffix("_total")  # Ray's exporter adds `_total` to counters
        doc = spec.doc.encode("ascii", "replace").decode()  # Ray's C++ side wants ASCII
        if spec.kind == "histogram":
            self.metric = ray_metrics.Histogram(
                name, doc, boundaries=list(spec.buckets), tag_keys=spec.labels
            )
        elif spec.kind == "counter":
            self.metric = ray_metrics.Counter(name, doc, tag_keys=spec.labels)
        else:
            self.metric = ray_metrics.Gauge(name, doc, tag_keys=spec.labels)

    def labels(self, **tags: str) -> _Tagged:
        return _Tagged(self.metric, tags)


class RayBackend:
    def make(self, spec: MetricSpec) -> _RayMetric:
        return _RayMetric(spec)


@dataclass(frozen=True)
class Failure:
    """An expected refusal, returned (not raised) across the deployment handle."""

    error: Exception


@serve.deployment(
    name="MarcheEngine",
    ray_actor_options={"num_gpus": 1},
    max_ongoing_requests=256,  # >= queue_size + max_batch_size, or batches never fill
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=120,
)
class MarcheEngine:
    """The model and its batching worker; settings from MARCHE_* (the cluster's environment)."""

    def __init__(self) -> None:
        settings = ServiceSettings()
        self.client = LocalEngineClient(settings, Metrics(RayBackend(), settings.model, MODES))
        self.client.start()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.client.worker.configure(
            max_batch_size=user_config.get("max_batch_size"),
            max_wait_ms=user_config.get("max_wait_ms"),
        )

    def check_health(self) -> None:
        if self.client.worker.last_error or not self.client.worker.alive:
            raise RuntimeError(self.client.worker.last_error or "engine worker stopped")

    async def info(self) -> dict[str, Any]:
        return await self.client.info()

    async def readiness(self) -> tuple[bool, str]:
        return await self.client.readiness()

    async def generate(self, request: EngineRequest) -> JobResult | Failure:
        try:
            return await self.client.generate(request)
        except EXPECTED as exc:
            return Failure(exc)

    async def stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any] | Failure]:
        try:
            async for event in self.client.stream(request):
                yield event
        except EXPECTED as exc:
            yield Failure(exc)


def _replica_failed(exc: RayError) -> EngineError:
    return EngineError(f"the engine replica failed ({type(exc).__name__}); retry the request")


class RayEngineClient:
    """The ingress side: the `EngineClient` protocol over a deployment handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()

    async def readiness(self) -> tuple[bool, str]:
        try:
            return await self.handle.readiness.remote()
        except RayError as exc:
            return False, str(_replica_failed(exc))

    async def generate(self, request: EngineRequest) -> JobResult:
        try:
            result = await self.handle.generate.remote(request)
        except RayError as exc:  # the replica died (or raised something unexpected)
            raise _replica_failed(exc) from exc
        if isinstance(result, Failure):
            raise result.error
        return result

    async def stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        try:
            async for event in self.handle.options(stream=True).stream.remote(request):
                if isinstance(event, Failure):
                    raise event.error
                yield event
        except RayError as exc:
            raise _replica_failed(exc) from exc


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=512)
@serve.ingress()
class Ingress:
    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine

    def __serve_build_asgi_app__(self):
        settings = ServiceSettings()
        metrics = Metrics(RayBackend(), settings.model, MODES)
        return build_app(settings, RayEngineClient(self.engine), metrics)


def application(options: dict[str, dict[str, Any]] | None = None) -> serve.Application:
    """Ingress -> MarcheEngine, each with its deployment options (a Serve config's)."""
    options = options or {}
    engine = MarcheEngine.options(**options.get("MarcheEngine", {})).bind()
    return Ingress.options(**options.get("Ingress", {})).bind(engine)


app = application()


def run(
    config: Path, host: str, port: int, metrics_port: int = 8080, num_gpus: float | None = None
) -> None:
    """`marche serve --ray`: start a local Ray cluster owned by this process (its metrics
    exporter on `metrics_port`), deploy `config`'s application on `host`:`port`, and serve
    until SIGTERM or SIGINT; then shut Serve down (replicas drain, up to their
    graceful_shutdown_timeout_s) and stop the cluster. Without CUDA the engine asks for no GPU
    (CPU fallback: a GPU request would never be scheduled). Nothing is written to disk."""
    import torch

    spec = yaml.safe_load(Path(config).read_text())
    (application_spec,) = spec["applications"]  # one application: ours
    if application_spec.get("import_path", IMPORT_PATH) != IMPORT_PATH:
        raise SystemExit(f"{config}: marche serve --ray runs {IMPORT_PATH} only")
    options = {
        d["name"]: {k: v for k, v in d.items() if k != "name"}
        for d in application_spec.get("deployments", [])
    }
    if num_gpus is None and not torch.cuda.is_available():
        num_gpus = 0
    if num_gpus is not None:
        engine = options.setdefault("MarcheEngine", {})
        engine["ray_actor_options"] = {**engine.get("ray_actor_options", {}), "num_gpus": num_gpus}

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
    finally:
        serve.shutdown()
        ray.shutdown()
