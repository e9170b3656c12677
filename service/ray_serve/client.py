"""The ingress side of the engine deployment: the `EngineClient` protocol over a Serve handle.

* **Spill.** A replica whose queue is full answers with a `Failure(QueueFull)` naming itself;
  the request goes again with that replica in `avoid` (the work-aware router ranks it last), so
  a 503 reaches the client only when every replica refused. Its Retry-After is the shortest
  any replica gave: the wait at the replica that would take the request first.
* **A replica lost mid-request** (killed, its node gone): a `/generate` is retried once on a
  survivor. An image is a function of its seed, so the retry returns the same image. A stream
  that already sent events ends with its `error` event instead (a retry would send them twice).
* Both are counted in `marche_engine_retries_total` (reason queue_full / replica_lost).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.handle import DeploymentHandle

from engine.decode.policy import preset
from service.core.client import EngineRequest
from service.core.jobs import EngineError, JobResult, QueueFull, TenantBusy
from service.metrics import Metrics
from service.ray_serve import view

log = logging.getLogger("marche.ray")
MAX_SPILLS = 64  # bound on replicas tried for one request (the deployment's max_replicas)


@dataclass(frozen=True)
class Failure:
    """An expected refusal, returned (not raised) across the deployment handle: raised, Ray
    would log an ERROR traceback and count a deployment error for every 503."""

    error: Exception
    replica: str = ""  # the replica that refused (spill: the router ranks it last next time)


def replica_failed(exc: RayError) -> EngineError:
    return EngineError(f"the engine replica failed ({type(exc).__name__}); retry the request")


def work(request: EngineRequest) -> int:
    """The request's image-steps: what the router weighs it by."""
    return len(request.seeds) * preset(request.mode).num_steps(request.params.num_iter)


class RayEngineClient:
    def __init__(
        self, handle: DeploymentHandle, metrics: Metrics | None = None, app_name: str = "marche"
    ) -> None:
        self.handle, self.metrics, self.app_name = handle, metrics, app_name

    async def info(self) -> dict[str, Any]:
        info = await self.handle.info.remote()
        return {**info, "replicas": await self.replicas()}

    async def replicas(self) -> dict[str, Any]:
        """Engine replicas by state (Serve's controller), and what this ingress's router last
        saw of each (work-aware router only)."""
        return {"states": await self._states(), "engines": view.replicas()}

    async def _states(self) -> dict[str, int]:
        status = await asyncio.to_thread(serve.status)  # a controller call: off the loop
        app = status.applications.get(self.app_name)
        deployment = app.deployments.get(self.handle.deployment_name) if app else None
        if deployment is None:
            return {}
        return {str(getattr(s, "value", s)): n for s, n in deployment.replica_states.items()}

    async def readiness(self) -> tuple[bool, str]:
        """Ready while at least one engine replica runs (a replica turns RUNNING only after its
        warm-up, and Serve's health checks take failing ones out)."""
        try:
            states = await self._states()
        except Exception as exc:  # noqa: BLE001 - any failure to ask is "not ready", said why
            return False, f"Serve controller unreachable ({type(exc).__name__})"
        running = states.get("RUNNING", 0)
        if running == 0:
            return False, f"no engine replica running ({states or 'none deployed'})"
        return True, f"ready: {running} of {sum(states.values())} engine replicas running"

    def _retried(self, reason: str) -> None:
        if self.metrics:
            self.metrics.retried(reason)

    async def generate(self, request: EngineRequest) -> JobResult:
        avoid: list[str] = []
        refusals: list[QueueFull] = []
        lost = False
        while True:
            try:
                result = await self.handle.generate.remote(
                    request, work=work(request), avoid=tuple(avoid)
                )
            except RayActorError as exc:  # its replica died before answering
                if lost:
                    raise replica_failed(exc) from exc
                lost = True
                log.warning("request %s: engine replica lost, retrying", request.request_id)
                self._retried("replica_lost")
                continue
            except RayError as exc:  # something unexpected raised in the replica
                raise replica_failed(exc) from exc
            if not isinstance(result, Failure):
                return result
            if not _spill(result, avoid, refusals):
                raise _answer(result.error, refusals)
            self._retried("queue_full")

    async def stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        avoid: list[str] = []
        refusals: list[QueueFull] = []
        while True:
            events = self.handle.options(stream=True).stream.remote(
                request, work=work(request), avoid=tuple(avoid)
            )
            try:
                first = await anext(events)
            except RayError as exc:
                raise replica_failed(exc) from exc
            if not isinstance(first, Failure):
                break
            if not _spill(first, avoid, refusals):
                raise _answer(first.error, refusals)
            self._retried("queue_full")
        yield first
        try:
            async for event in events:
                if isinstance(event, Failure):
                    raise event.error
                yield event
        except RayError as exc:
            raise replica_failed(exc) from exc


def _spill(failure: Failure, avoid: list[str], refusals: list[QueueFull]) -> bool:
    """Whether to send the request on: `failure` is a queue-full refusal from a replica not
    asked yet (noted in `avoid`, which the router ranks last) and fewer than MAX_SPILLS have
    refused. False: not a refusal, or the router came back to a replica that refused already
    (every replica has)."""
    if not isinstance(failure.error, QueueFull) or failure.replica in avoid:
        return False
    refusals.append(failure.error)
    avoid.append(failure.replica)
    return len(avoid) < MAX_SPILLS


def _answer(error: Exception, refusals: list[QueueFull]) -> Exception:
    """Every replica refused: the 503 with the shortest wait any of them gave (a 429 when
    each refused for the tenant's share rather than a full queue)."""
    if isinstance(error, QueueFull) and refusals:
        retry = min(r.retry_after for r in [*refusals, error])
        if all(isinstance(r, TenantBusy) for r in [*refusals, error]):
            return TenantBusy(f"{error} on every engine replica ({len(refusals)} asked)", retry)
        return QueueFull(f"queue full on every engine replica ({len(refusals)} asked)", retry)
    return error
