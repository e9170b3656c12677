"""The engine worker: one thread owns the device and the model, and batches requests.

HTTP handlers `submit()` jobs into a bounded queue and await the job's future; they never
touch the model. The worker thread loops: gather a batch of compatible jobs (same steps and
mode; cfg, schedule and temperature may differ per row), run the MAR loop on it, resolve the
futures. Between decoding steps it retires jobs whose client went away or whose deadline
passed (the sampler drops their rows; batch mates are unaffected), and reports progress to
streaming jobs. An exception fails only the jobs of that batch; the loop keeps serving.

No fastapi, ray or asyncio here: futures are `concurrent.futures.Future`s, which asyncio
handlers await with `asyncio.wrap_future`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn.functional as F

from engine.decode.marche import MarcheConfig
from engine.decode.policy import MODES, make_policy
from engine.decode.sampler import StepInfo
from engine.images import images_to_uint8
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline
from service.metrics import Metrics

log = logging.getLogger("marche.worker")


class QueueFull(Exception):
    """The waiting queue is at capacity: answer 503 with Retry-After."""


class JobCancelled(Exception):
    """The job was dropped before finishing; `reason` is "disconnected" or "deadline"."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"request cancelled: {reason}")
        self.reason = reason


class EngineError(Exception):
    """The batch this job ran in failed."""


@dataclass
class JobResult:
    images: np.ndarray  # uint8 (n, H, W, C)
    seeds: list[int]
    queue_s: float
    generation_s: float
    batch_size: int  # images in the engine batch


@dataclass(eq=False)
class Job:
    """One HTTP request: `len(seeds)` images of one class with shared sampling params."""

    class_id: int
    seeds: list[int]
    params: SamplingParams
    mode: str
    deadline: float  # time.monotonic() after which the job is dropped
    request_id: str = ""
    # called from the worker thread with progress/preview events (streaming requests)
    on_event: Callable[[dict[str, Any]], None] | None = None
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)
    cancel_reason: str | None = None

    @property
    def key(self) -> tuple[int, str]:
        """Jobs with equal keys can share a batch."""
        return (self.params.num_iter, self.mode)

    def fail(self, exc: Exception) -> bool:
        if self.future.done():
            return False
        self.future.set_exception(exc)
        return True


class EngineWorker:
    def __init__(
        self,
        pipeline: Pipeline,
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 10.0,
        queue_size: int = 64,
        marche: MarcheConfig | None = None,
        metrics: Metrics | None = None,
        preview_every: int = 4,
    ) -> None:
        self.pipeline = pipeline
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000
        self.queue_size, self.preview_every = queue_size, preview_every
        self.marche = marche or MarcheConfig()
        self.metrics = metrics
        self.ready = False
        self.last_error: str | None = None
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the HTTP side (any thread) --------------------------------------------------------------

    def start(self, warmup: bool = True) -> None:
        self._thread = threading.Thread(
            target=self._loop, args=(warmup,), name="engine-worker", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running batch, fail what is still queued, end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def configure(self, max_batch_size: int | None = None, max_wait_ms: float | None = None):
        """Change batching knobs at runtime (from the next batch on)."""
        with self._cond:
            if max_batch_size is not None:
                self.max_batch_size = max_batch_size
            if max_wait_ms is not None:
                self.max_wait_s = max_wait_ms / 1000

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._stopping:
                raise QueueFull("the engine is shutting down")
            if len(self._waiting) >= self.queue_size:
                if self.metrics:
                    self.metrics.rejected("queue_full")
                raise QueueFull(f"queue full ({self.queue_size} requests waiting)")
            self._waiting.append(job)
            self._publish_state()
            self._cond.notify_all()
        return job.future

    def cancel(self, job: Job, reason: str = "disconnected") -> None:
        """Drop a job: at once if queued, at the next step boundary if running."""
        with self._cond:
            if job.cancel_reason is None:
                job.cancel_reason = reason
            if job in self._waiting:
                self._waiting.remove(job)
                self._drop(job)
                self._publish_state()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._cond:
            return len(self._running), len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the worker thread -----------------------------------------------------------------------

    def _loop(self, warmup: bool) -> None:
        if warmup:
            try:
                self._warmup()
            except Exception as exc:  # noqa: BLE001 - reported through /readyz
                log.exception("warmup failed")
                self.last_error = f"warmup failed: {exc}"
                return
        self.ready = True
        while (batch := self._next_batch()) is not None:
            self._run_batch(batch)
        with self._cond:  # shutting down: nothing accepted is silently lost
            while self._waiting:
                self._waiting.popleft().fail(QueueFull("the engine is shutting down"))

    def _warmup(self) -> None:
        """One small generation per mode (allocates, and on CUDA picks kernels)."""
        params = SamplingParams(num_iter=2, cfg=2.0)
        for mode in MODES:
            self.pipeline.generate([0], [0], params=params, policy=make_policy(mode, self.marche))

    def _next_batch(self) -> list[Job] | None:
        """Block until a batch is ready: full, or the oldest job waited max_wait."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                self._expire_waiting()
                if not self._waiting:
                    self._cond.wait()
                    continue
                batch = self._compatible(self._waiting[0])
                size = sum(len(j.seeds) for j in batch)
                wait = self._waiting[0].enqueued_at + self.max_wait_s - time.monotonic()
                if size >= self.max_batch_size or wait <= 0:
                    for job in batch:
                        self._waiting.remove(job)
                    self._running = batch
                    self._publish_state()
                    return batch
                self._cond.wait(timeout=wait)

    def _compatible(self, first: Job) -> list[Job]:
        """First-come jobs sharing `first`'s key, up to max_batch_size images."""
        batch, size = [first], len(first.seeds)
        for job in self._waiting:
            if job is not first and job.key == first.key:
                if size + len(job.seeds) > self.max_batch_size:
                    break
                batch.append(job)
                size += len(job.seeds)
        return batch

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._waiting if j.deadline <= now]:
            job.cancel_reason = job.cancel_reason or "deadline"
            self._waiting.remove(job)
            self._drop(job)
        self._publish_state()

    def _drop(self, job: Job) -> None:
        reason = job.cancel_reason or "disconnected"
        if job.fail(JobCancelled(reason)) and self.metrics:
            self.metrics.cancelled(job.mode, reason)

    def _wanted(self, job: Job, now: float) -> bool:
        if job.cancel_reason is None and job.deadline <= now:
            job.cancel_reason = "deadline"
        return job.cancel_reason is None

    def _run_batch(self, batch: list[Job]) -> None:
        mode, started = batch[0].mode, time.monotonic()
        owners = [job for job in batch for _ in job.seeds]  # row -> job
        if self.metrics:
            self.metrics.batch_started(mode, len(owners), [started - j.enqueued_at for j in batch])
        policy = make_policy(mode, self.marche)
        last = started

        def on_step(info: StepInfo) -> list[bool] | None:
            nonlocal last, owners
            now = time.monotonic()
            if self.metrics:
                self.metrics.step(mode, now - last)
            last = now
            self._progress(owners, info)
            keep = [self._wanted(job, now) for job in owners]
            if all(keep):
                return None
            for job in {j for j, k in zip(owners, keep, strict=True) if not k}:
                self._drop(job)
            owners = [j for j, k in zip(owners, keep, strict=True) if k]
            return keep

        try:
            tokens = self.pipeline.generate_tokens(
                [j.class_id for j in owners],
                [s for j in batch for s in j.seeds],
                params=[j.params for j in owners],
                policy=policy,
                on_step=on_step,
            )
            images = images_to_uint8(self.pipeline.decode(tokens)) if len(owners) else None
        except Exception as exc:  # noqa: BLE001 - fail this batch, keep serving
            log.exception("batch of %d images failed", len(owners))
            for job in batch:
                job.fail(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
            self._finish_batch()
            return
        elapsed = time.monotonic() - started
        if self.metrics:
            self.metrics.active_fractions(mode, getattr(policy, "stats", []))
        row = 0
        for job in dict.fromkeys(owners):  # surviving jobs, in row order
            n = len(job.seeds)
            result = JobResult(
                images[row : row + n], job.seeds, started - job.enqueued_at, elapsed, len(owners)
            )
            row += n
            if not job.future.done():
                job.future.set_result(result)
                if self.metrics:
                    self.metrics.images(mode, n)
        self._finish_batch()

    def _finish_batch(self) -> None:
        with self._cond:
            self._running = []
            self._publish_state()

    def _progress(self, owners: list[Job], info: StepInfo) -> None:
        """Progress (and every `preview_every` steps a small preview) for streaming jobs."""
        done = info.step + 1 == info.num_iter
        row = 0
        for job in dict.fromkeys(owners):
            n = len(job.seeds)
            if job.on_event is not None:
                event: dict[str, Any] = {
                    "step": info.step + 1,
                    "total": info.num_iter,
                    "tokens_done": info.tokens_done,
                    "seq_len": info.seq_len,
                }
                if not done and (info.step + 1) % self.preview_every == 0:
                    event["preview"] = self._preview(info.tokens[row : row + 1])
                job.on_event(event)
            row += n

    def _preview(self, tokens) -> np.ndarray:
        """uint8 (h, w, C) of the partial image, at most 64 px (unknown tokens are zero)."""
        image = self.pipeline.decode(tokens)  # (1, C, H, W)
        if image.shape[-1] > 64:
            image = F.interpolate(image, size=(64, 64), mode="area")
        return images_to_uint8(image)[0]

    def _publish_state(self) -> None:
        if self.metrics:
            self.metrics.queue_state(len(self._running), len(self._waiting))
