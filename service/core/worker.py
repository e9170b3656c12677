"""The engine worker: one thread owns the device and the model, and schedules requests.

HTTP handlers `submit()` jobs into a bounded queue and await the job's future; they never
touch the model. The worker thread runs one of two schedulers (`service.scheduler`):

* `continuous` (default): step-level batching. At every step boundary finished and
  cancelled rows leave the running batch and waiting requests join it (FIFO, up to
  `max_batch_size` images); rows at different steps, with different steps counts, cfg,
  classes and modes share every step, each keeping its own caches in the engine's slot pool;
* `static`: run-to-completion batches of compatible jobs (same steps and mode).

Either way, jobs whose client went away or whose deadline passed leave between steps (batch
mates are unaffected), streaming jobs get progress, and an exception fails only the jobs
that were in the failing step; the loop keeps serving.

No fastapi, ray or asyncio here: futures are `concurrent.futures.Future`s, which asyncio
handlers await with `asyncio.wrap_future`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from engine.decode.marche import MarcheConfig
from engine.pipeline import Pipeline
from service.jobs import EngineError, Job, JobCancelled, JobResult, QueueFull
from service.memory import trim_heap
from service.metrics import Metrics
from service.scheduler import ContinuousScheduler, PipelineRows, RowEngine, StaticScheduler
from service.schemas import MAX_IMAGES

__all__ = ["EngineError", "EngineWorker", "Job", "JobCancelled", "JobResult", "QueueFull"]

SCHEDULERS = ("continuous", "static")

log = logging.getLogger("marche.worker")


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
        scheduler: str = "continuous",
        rows: RowEngine | None = None,
        retry_after_s: int = 1,
        idle_trim_s: float = 1.0,
    ) -> None:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}")
        self.pipeline = pipeline
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000
        self.queue_size, self.preview_every = queue_size, preview_every
        self.marche = marche or MarcheConfig()
        self.metrics = metrics
        self.ready = False
        self.last_error: str | None = None
        self._waiting: deque[Job] = deque()
        self.min_retry_after_s = retry_after_s
        self._completed: deque[tuple[float, int]] = deque()  # (time, images) of recent jobs
        self._running: dict[Job, Any] = {}  # running jobs (-> their rows, continuous)
        self._scheduler: StaticScheduler | ContinuousScheduler
        if scheduler == "static":
            self._scheduler = StaticScheduler(self)
        else:
            capacity = max(max_batch_size, MAX_IMAGES)  # any single request fits
            rows = rows or PipelineRows(pipeline, capacity, self.marche)
            self._scheduler = ContinuousScheduler(self, rows)
        self._cond = threading.Condition()
        self.idle_trim_s = idle_trim_s  # idle this long after work: give freed heap back
        self._worked = False  # work arrived since the heap was last trimmed
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the HTTP side (any thread) --------------------------------------------------------------

    def start(self, warmup: bool = True) -> None:
        self._thread = threading.Thread(
            target=self._loop, args=(warmup,), name="engine-worker", daemon=True
        )
        self._thread.start()

    def drain(self) -> None:
        """Begin shutting down: accept nothing more, answer every queued job at once (503),
        let the running ones finish."""
        with self._cond:
            self._stopping = True
            while self._waiting:
                self._waiting.popleft().fail(QueueFull("the engine is shutting down"))
            self._publish_state()
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain, then wait up to `timeout` s for the running jobs and the thread to end."""
        self.drain()
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
                retry = self.retry_after_s()
                raise QueueFull(f"queue full ({self.queue_size} requests waiting)", retry)
            self._waiting.append(job)
            self._worked = True
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

    def note_images(self, count: int, at: float | None = None) -> None:
        """Images finished (any thread): the throughput Retry-After is derived from."""
        with self._cond:
            self._completed.append((time.monotonic() if at is None else at, count))

    def retry_after_s(self, window_s: float = 60.0) -> int:
        """Seconds until the images ahead of a new request are likely done: images queued and
        running ÷ images/s over the last `window_s` (at least `min_retry_after_s`, at most
        10 min). Call with the lock held."""
        now = time.monotonic()
        while self._completed and now - self._completed[0][0] > window_s:
            self._completed.popleft()
        ahead = sum(len(j.seeds) for j in self._waiting) + sum(len(j.seeds) for j in self._running)
        if len(self._completed) < 2 or now <= self._completed[0][0]:
            return self.min_retry_after_s
        rate = sum(n for _, n in self._completed) / (now - self._completed[0][0])
        return int(min(600, max(self.min_retry_after_s, math.ceil(ahead / rate))))

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
                self._scheduler.warmup()
            except Exception as exc:  # noqa: BLE001 - reported through /readyz
                log.exception("warmup failed")
                self.last_error = f"warmup failed: {exc}"
                return
        self.ready = True
        self._scheduler.run()
        with self._cond:  # shutting down: nothing accepted is silently lost
            while self._waiting:
                self._waiting.popleft().fail(QueueFull("the engine is shutting down"))

    def _wait_for_work(self) -> None:
        """Block (holding `_cond`) until something may have changed. Once the engine has
        been idle `idle_trim_s` after work, return the heap that work freed to the OS."""
        if not self._worked:
            self._cond.wait()
        elif not self._cond.wait(timeout=self.idle_trim_s):
            self._worked = False
            self._cond.release()  # trimming takes milliseconds: don't hold up submit()
            try:
                trim_heap()
            finally:
                self._cond.acquire()

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

    def progress(
        self,
        job: Job,
        step: int,
        total: int,
        tokens_done: int,
        seq_len: int,
        preview: Callable[[], np.ndarray] | None,
    ) -> None:
        """Report a step to a streaming job (with a small preview every `preview_every`)."""
        if job.on_event is None:
            return
        event: dict[str, Any] = {
            "step": step,
            "total": total,
            "tokens_done": tokens_done,
            "seq_len": seq_len,
        }
        if preview is not None and step < total and step % self.preview_every == 0:
            event["preview"] = preview()
        job.on_event(event)

    def _publish_state(self) -> None:
        if self.metrics:
            self.metrics.queue_state(len(self._running), len(self._waiting))
