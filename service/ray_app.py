"""Ray Serve runtime: an HTTP ingress deployment and a GPU engine deployment (the only Ray import).

    serve run deploy/serve_config.yaml        # or: marche serve --ray

`Ingress` (CPU) runs the same FastAPI app as uvicorn, built by `build_app` with a client that
calls `MarcheEngine` through a deployment handle. `MarcheEngine` (one per GPU) owns the model
and an `EngineWorker` with its own batcher rather than `@serve.batch`: the worker batches by
compatibility (steps, mode), retires cancelled rows *between decoding steps* (a `@serve.batch`
batch cannot shed members once running) and reports per-step progress for streaming. Its batch
knobs change at runtime through `user_config` (`max_batch_size`, `max_wait_ms`).
Metrics use `ray.serve.metrics`, exported by Ray's per-node exporter as `ray_marche_*`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve import metrics as ray_metrics
from ray.serve.handle import DeploymentHandle

from service.app import build_app
from service.engine_client import EngineRequest, LocalEngineClient
from service.metrics import Metrics, MetricSpec
from service.settings import ServiceSettings
from service.worker import JobResult


class _Tagged:
    def __init__(self, metric: Any, tags: dict[str, str]) -> None:
        self.metric, self.tags = metric, tags

    def observe(self, value: float) -> None:
        self.metric.observe(value, tags=self.tags)

    def inc(self, value: float = 1.0) -> None:
        if value == 0:  # Ray's Counter refuses 0: series are not pre-created under Ray yet
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


@serve.deployment(
    name="MarcheEngine",
    ray_actor_options={"num_gpus": 1},
    max_ongoing_requests=256,  # >= queue_size + max_batch_size, or batches never fill
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=120,
)
class MarcheEngine:
    """The model and its batching worker; settings from MARCHE_* (runtime_env env_vars)."""

    def __init__(self) -> None:
        settings = ServiceSettings()
        self.client = LocalEngineClient(settings, Metrics(RayBackend(), settings.model))
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

    async def generate(self, request: EngineRequest) -> JobResult:
        return await self.client.generate(request)

    async def stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        async for event in self.client.stream(request):
            yield event


class RayEngineClient:
    """The ingress side: the `EngineClient` protocol over a deployment handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()

    async def readiness(self) -> tuple[bool, str]:
        return await self.handle.readiness.remote()

    async def generate(self, request: EngineRequest) -> JobResult:
        # Ray re-raises the engine's QueueFull/JobCancelled/EngineError as their own types
        return await self.handle.generate.remote(request)

    async def stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        async for event in self.handle.options(stream=True).stream.remote(request):
            yield event


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=512)
@serve.ingress()
class Ingress:
    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine

    def __serve_build_asgi_app__(self):
        settings = ServiceSettings()
        metrics = Metrics(RayBackend(), settings.model)
        return build_app(settings, RayEngineClient(self.engine), metrics)


app = Ingress.bind(MarcheEngine.bind())


def run_from_config(config: Path, host: str, port: int, num_gpus: float | None = None) -> None:
    """`serve run` a copy of `config` with our host/port; without CUDA, the engine on CPU."""
    import torch

    spec = yaml.safe_load(Path(config).read_text())
    spec.setdefault("http_options", {}).update(host=host, port=port)
    if num_gpus is None and not torch.cuda.is_available():
        num_gpus = 0  # CPU fallback: a GPU request would never be scheduled here
    if num_gpus is not None:
        for application in spec["applications"]:
            for deployment in application.get("deployments", []):
                if deployment["name"] == "MarcheEngine":
                    deployment.setdefault("ray_actor_options", {})["num_gpus"] = num_gpus
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(spec, f)
    serve_cli = Path(sys.executable).with_name("serve")
    raise SystemExit(subprocess.call([str(serve_cli), "run", f.name], env=os.environ.copy()))
