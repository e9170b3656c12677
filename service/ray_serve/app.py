"""Ray Serve runtime: an HTTP ingress deployment and N engine deployments' replicas.

    marche serve --ray                        # `service.ray_serve.run`: a local Ray it owns
    serve run service/ray_serve/serve_config.yaml   # or Serve's CLI, in a cluster of yours

`Ingress` (CPU) runs the same FastAPI app as uvicorn, built by `build_app` with a
`RayEngineClient` that calls `MarcheEngine` through a deployment handle. `MarcheEngine` (one
replica per GPU) owns the model and an `EngineWorker` with its own scheduler rather than
`@serve.batch`: rows join and leave the running batch between decoding steps (a `@serve.batch`
batch cannot shed members once running) and streaming gets per-step progress. Its batch knobs
change at runtime through `user_config`.

Each engine replica reports its outstanding work to the router (`record_routing_stats`, for
`LeastWorkRouter`) and to the autoscaler (`record_autoscaling_stats`, for `WorkPolicy`); it
turns RUNNING, and so gets traffic, only once warmed up. Expected refusals cross the handle as
`Failure` values (see `client.py`), which the ingress spills to other replicas.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from engine.decode.policy import MODES
from service.core.client import EngineRequest, LocalEngineClient
from service.core.jobs import EngineError, JobCancelled, JobResult, QueueFull
from service.http.app import build_app
from service.metrics import Metrics
from service.ray_serve.client import Failure, RayEngineClient
from service.ray_serve.metrics import RayBackend
from service.ray_serve.router import ROUTER_PATH
from service.settings import ServiceSettings

log = logging.getLogger("marche.ray")
IMPORT_PATH = "service.ray_serve.app:app"  # the Serve application (serve_config.yaml)
EXPECTED = (QueueFull, JobCancelled, EngineError)  # outcomes the app answers (503/504/499/500)
# The work-aware router's stats: reported every 0.5 s, stale after 2 s (then Ray's default).
WORK_ROUTER = RequestRouterConfig(
    request_router_class=ROUTER_PATH,
    request_router_kwargs={"stale_after_s": 2.0},
    request_routing_stats_period_s=0.5,
    request_routing_stats_timeout_s=2.0,
)


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
        if settings.torch_threads:  # CPU replicas share the machine's cores
            torch.set_num_threads(settings.torch_threads)
        self.client = LocalEngineClient(settings, Metrics(RayBackend(), settings.model, MODES))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._seq = itertools.count()
        self.client.start()
        worker = self.client.worker
        while not worker.ready:  # RUNNING (routable) only once warmed up
            if worker.last_error or not worker.alive:
                raise RuntimeError(worker.last_error or "engine worker stopped")
            time.sleep(0.05)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.client.worker.configure(
            max_batch_size=user_config.get("max_batch_size"),
            max_wait_ms=user_config.get("max_wait_ms"),
        )

    def check_health(self) -> None:
        if self.client.worker.last_error or not self.client.worker.alive:
            raise RuntimeError(self.client.worker.last_error or "engine worker stopped")

    def record_routing_stats(self) -> dict[str, Any]:
        """For `LeastWorkRouter` (Serve's threadpool: reads the queue under its lock)."""
        queue = self.client.worker.queue
        running, waiting = queue.counts()
        return {
            "seq": next(self._seq),  # every report differs: the router can tell stale ones
            "image_steps": queue.image_steps(),
            "free_slots": max(0, queue.slots - queue.rows_in_use()),
            "start_s": queue.expected_wait_s() or 0.0,  # a new request's, under the policy
            "step_s": queue.step_time.seconds,
            "rows": queue.max_batch_size,
            "running": running,
            "waiting": waiting,
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """For `WorkPolicy`: seconds of queued and running work, and how many requests."""
        queue = self.client.worker.queue
        running, waiting = queue.counts()
        return {"wait_s": queue.expected_wait_s() or 0.0, "requests": float(running + waiting)}

    async def info(self) -> dict[str, Any]:
        return {**await self.client.info(), "replica": self.replica}

    async def readiness(self) -> tuple[bool, str]:
        return await self.client.readiness()

    async def generate(
        self, request: EngineRequest, work: int = 0, avoid: tuple[str, ...] = ()
    ) -> JobResult | Failure:
        """`work` and `avoid` are the router's (the request's image-steps; replicas that
        refused it already)."""
        try:
            return await self.client.generate(request)
        except EXPECTED as exc:
            return Failure(exc, self.replica)

    async def stream(
        self, request: EngineRequest, work: int = 0, avoid: tuple[str, ...] = ()
    ) -> AsyncIterator[dict[str, Any] | Failure]:
        try:
            async for event in self.client.stream(request):
                yield event
        except EXPECTED as exc:
            yield Failure(exc, self.replica)


@serve.deployment(
    name="Ingress",
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=512,
    graceful_shutdown_timeout_s=120,  # waits for the engine's answers to what it accepted
)
@serve.ingress()
class Ingress:
    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine

    def __serve_build_asgi_app__(self):
        settings = ServiceSettings()
        metrics = Metrics(RayBackend(), settings.model, MODES)
        app_name = serve.get_replica_context().app_name
        return build_app(settings, RayEngineClient(self.engine, metrics, app_name), metrics)


def application(options: dict[str, dict[str, Any]] | None = None) -> serve.Application:
    """Ingress -> MarcheEngine, each with its deployment options (a Serve config's). The engine
    takes the work-aware router unless MARCHE_ROUTER=default (Ray's own, to compare)."""
    options = {name: dict(opts) for name, opts in (options or {}).items()}
    engine_options = options.get("MarcheEngine", {})
    if ServiceSettings().router == "work":
        engine_options.setdefault("request_router_config", WORK_ROUTER)
    engine = MarcheEngine.options(**engine_options).bind()
    return Ingress.options(**options.get("Ingress", {})).bind(engine)


app = application()
