"""How the HTTP layer reaches the engine: in-process (uvicorn) or through Ray Serve.

`EngineRequest` / `JobResult` are plain picklable data, so the same contract crosses a Ray
deployment handle. `LocalEngineClient` owns an `EngineWorker` thread; `service.ray_serve.app` wraps
one inside the GPU deployment and exposes it to the ingress through a handle.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from engine.model.config import SamplingParams
from engine.pipeline import Pipeline
from service.core.jobs import ANONYMOUS, Job, JobResult
from service.core.rows import RowEngine
from service.core.worker import EngineWorker
from service.metrics import Metrics
from service.settings import ServiceSettings


@dataclass(frozen=True)
class EngineRequest:
    class_id: int
    seeds: list[int]
    params: SamplingParams
    mode: str
    timeout_s: float
    request_id: str = ""
    tenant: str = ANONYMOUS  # a hashed key or user (service/http/auth.py)
    priority: int = 0


class EngineClient(Protocol):
    async def info(self) -> dict[str, Any]: ...

    async def readiness(self) -> tuple[bool, str]: ...

    async def generate(self, request: EngineRequest) -> JobResult:
        """Raises QueueFull, JobCancelled, EngineError; cancelling the call drops the job."""
        ...

    def stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        """{"accepted": True} once queued (admission errors raise before it), progress
        events, then {"result": JobResult}."""
        ...


def model_info(pipeline: Pipeline, settings: ServiceSettings) -> dict[str, Any]:
    """What /info and /classes show about the loaded model."""
    spec, config = pipeline.spec, pipeline.model.config
    return {
        "model": pipeline.name,
        "device": str(pipeline.device),
        "dtype": str(pipeline.dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in pipeline.model.parameters()),
        "image_size": config.img_size,
        "seq_len": config.seq_len,
        "num_classes": config.class_num,
        "labels": list(spec.labels) if spec.labels else [str(i) for i in range(config.class_num)],
        "defaults": {
            "steps": spec.defaults.num_iter,
            "cfg": spec.defaults.cfg,
            "cfg_schedule": spec.defaults.cfg_schedule,
            "temperature": spec.defaults.temperature,
            "mode": settings.default_mode,
        },
        "marche": settings.marche_config().__dict__,
        "batching": {
            "scheduler": settings.scheduler,
            "scheduling_policy": settings.scheduling_policy,
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "queue_size": settings.queue_size,
            "request_timeout_s": settings.request_timeout_s,
        },
    }


def load_pipeline(settings: ServiceSettings) -> Pipeline:
    """The model, loaded on a short-lived thread of its own.

    A thread that has run a parallel (OpenMP) op keeps its thread team while it lives, and on
    a small machine every other thread's parallel ops then run ~3x slower (measured: a digits
    step 16 ms on the worker thread when the model was loaded elsewhere, 52-64 ms when the
    event loop's thread had loaded it). The event loop and Ray's actor thread live for the
    whole process, so they never run torch: loading happens here, decoding on the worker."""
    result: list[Pipeline] = []
    errors: list[BaseException] = []

    def load() -> None:
        try:
            result.append(_load(settings))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=load, name="model-load")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def _load(settings: ServiceSettings) -> Pipeline:
    return Pipeline.load(
        settings.model,
        checkpoint=settings.checkpoint,
        vae=settings.vae,
        device=settings.device,
        dtype=settings.dtype,
        random_weights=settings.random_weights,
        units=settings.units,
        head_buckets=settings.head_buckets,
        pass_buckets=settings.pass_buckets,
        max_batch_size=settings.max_batch_size,
    )


class LocalEngineClient:
    """The engine in this process: a worker thread fed by asyncio handlers."""

    def __init__(
        self,
        settings: ServiceSettings,
        metrics: Metrics | None = None,
        rows: RowEngine | None = None,
    ) -> None:
        """`rows`: another engine under the scheduler (the load bench's synthetic one); the
        pipeline still gives the model's facts."""
        self.settings = settings
        self.pipeline = load_pipeline(settings)
        self.worker = EngineWorker(
            self.pipeline,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            marche=settings.marche_config(),
            metrics=metrics,
            preview_every=settings.preview_every,
            scheduler=settings.scheduler,
            retry_after_s=settings.retry_after_s,
            rows=rows,
            policy=settings.scheduling_policy,
            pause_rows=settings.pause_rows,
            aging_s=settings.aging_s,
            tenant_queue_size=settings.tenant_queue_size,
            warmup_steps=warmup_steps(settings.warmup_steps, self.pipeline),
        )
        self._info = model_info(self.pipeline, settings)

    def start(self) -> None:
        self.worker.start(warmup=self.settings.warmup)

    def drain(self) -> None:
        """Shutdown has begun: queued requests get 503 now, running ones finish."""
        self.worker.drain()

    def stop(self) -> None:
        self.worker.stop(self.settings.shutdown_grace_s)

    async def info(self) -> dict[str, Any]:
        running, waiting = self.worker.counts()
        units = self.pipeline.units.families()
        return {
            **self._info,
            "units": {k: u.stats.as_dict() if u else {"mode": "off"} for k, u in units.items()},
            "scheduling": self.worker.scheduling(),
            "ready": self.worker.ready,
            "running": running,
            "waiting": waiting,
        }

    async def readiness(self) -> tuple[bool, str]:
        if self.worker.last_error:
            return False, self.worker.last_error
        if not self.worker.alive:
            return False, "engine worker is not running"
        if not self.worker.ready:
            return False, "warming up"
        return True, "ready"

    def _job(self, request: EngineRequest, on_event=None) -> Job:
        return Job(
            class_id=request.class_id,
            seeds=list(request.seeds),
            params=request.params,
            mode=request.mode,
            deadline=time.monotonic() + request.timeout_s,
            request_id=request.request_id,
            tenant=request.tenant,
            priority=request.priority,
            on_event=on_event,
        )

    async def generate(self, request: EngineRequest) -> JobResult:
        job = self._job(request)
        future = self.worker.submit(job)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the caller (client) went away
            self.worker.cancel(job, "disconnected")
            raise

    async def stream(self, request: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        job = self._job(request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        result = asyncio.wrap_future(self.worker.submit(job))
        try:
            yield {"accepted": True}
            while not result.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, result}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield {"result": result.result()}
        finally:  # closed early (client gone, generator cancelled): drop the job
            if not result.done():
                self.worker.cancel(job, "disconnected")
                result.cancel()  # nobody awaits it now: its JobCancelled must not be logged


def warmup_steps(setting: int | str, pipeline: Pipeline) -> int | None:
    """The warm-up's steps (None: every row to its end) for the `warmup_steps` setting."""
    if setting == "auto":
        graphs = any(u is not None and u.mode == "cuda-graphs"
                     for u in pipeline.units.families().values())  # fmt: skip
        return None if graphs else 3
    return None if setting == "all" else int(setting)
