"""The jobs that the HTTP side and the worker thread share, under one lock.

HTTP handlers `submit()` and `cancel()` from any thread; the worker thread's scheduler admits
from `waiting` (FIFO), keeps `running` (job -> its rows) and blocks in `wait_for_work()` when
there is nothing to do. Every change of the two collections happens with `cond` held.

The queue also knows how much work it holds, in **image-steps** (one image advanced one
decoding step: a 4-image 32-step request is 128), and how long a step takes (`StepTime`:
measured at warm-up, then a moving average). From the two, the wait a new request would see:

    wait_s = step_s × ceil(image_steps_ahead / rows_at_once)

where `image_steps_ahead` is what the queued and running jobs still have to run and
`rows_at_once` the images one step decodes together (`max_batch_size`). A 503's Retry-After is
that wait, rounded up, at least `MARCHE_RETRY_AFTER_S` and at most 10 minutes.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

from service.core.jobs import Job, JobCancelled, QueueFull
from service.core.memory import trim_heap
from service.metrics import Metrics


class StepTime:
    """Seconds per engine step: the first measurement (warm-up), then an exponential moving
    average over every step (`alpha`: the weight of the newest)."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.seconds: float | None = None

    def observe(self, seconds: float) -> None:
        if self.seconds is None:
            self.seconds = seconds
        else:
            self.seconds += self.alpha * (seconds - self.seconds)


class JobQueue:
    def __init__(
        self,
        *,
        queue_size: int,
        max_batch_size: int,
        max_wait_s: float,
        metrics: Metrics | None = None,
        retry_after_s: int = 1,
        idle_trim_s: float = 1.0,
    ) -> None:
        self.queue_size, self.max_batch_size = queue_size, max_batch_size
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.min_retry_after_s = retry_after_s
        self.idle_trim_s = idle_trim_s  # idle this long after work: give freed heap back
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.running: dict[Job, Any] = {}  # running jobs (-> their rows, continuous)
        self.stopping = False
        self.step_time = StepTime()
        self._worked = False  # work arrived since the heap was last trimmed

    # -- the HTTP side (any thread) --------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise QueueFull("the engine is shutting down")
            if len(self.waiting) >= self.queue_size:
                if self.metrics:
                    self.metrics.rejected("queue_full")
                retry = self.retry_after_s()
                raise QueueFull(f"queue full ({self.queue_size} requests waiting)", retry)
            self.waiting.append(job)
            self._worked = True
            self.publish_state()
            self.cond.notify_all()

    def cancel(self, job: Job, reason: str) -> None:
        """Drop a job: at once if queued, at the next step boundary if running."""
        with self.cond:
            if job.cancel_reason is None:
                job.cancel_reason = reason
            if job in self.waiting:
                self.waiting.remove(job)
                self.drop(job)
                self.publish_state()

    def drain(self) -> None:
        """Accept nothing more and answer every queued job at once (503)."""
        with self.cond:
            self.stopping = True
            self.refuse_waiting()
            self.publish_state()
            self.cond.notify_all()

    def refuse_waiting(self) -> None:
        """503 for every queued job (shutting down: nothing accepted is silently lost)."""
        with self.cond:
            while self.waiting:
                self.waiting.popleft().fail(QueueFull("the engine is shutting down"))

    def image_steps(self) -> int:
        """Work the queued and running jobs still have to run, in image-steps."""
        with self.cond:
            return sum(j.work_left for j in self.waiting) + sum(j.work_left for j in self.running)

    def rows_in_use(self) -> int:
        """Rows the running jobs hold in the engine's pool (static: their images)."""
        with self.cond:
            return sum(len(j.seeds) if r is None else len(r) for j, r in self.running.items())

    def expected_wait_s(self, image_steps: int | None = None) -> float | None:
        """Seconds a request accepted now would wait for the work ahead of it (the module's
        formula; `image_steps` when the caller has counted them); None before any step was
        timed."""
        step_s = self.step_time.seconds
        if step_s is None:
            return None
        ahead = self.image_steps() if image_steps is None else image_steps
        return step_s * math.ceil(ahead / max(1, self.max_batch_size))

    def retry_after_s(self) -> int:
        """Retry-After of a 503: the expected wait, rounded up, within
        [`min_retry_after_s`, 600]."""
        wait = self.expected_wait_s()
        if wait is None:
            return self.min_retry_after_s
        return int(min(600, max(self.min_retry_after_s, math.ceil(wait))))

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self.cond:
            return len(self.running), len(self.waiting)

    # -- the worker thread (with `cond` held) ----------------------------------------------------

    def wait_for_work(self) -> None:
        """Block until something may have changed. Once the engine has been idle
        `idle_trim_s` after work, return the heap that work freed to the OS."""
        if not self._worked:
            self.cond.wait()
        elif not self.cond.wait(timeout=self.idle_trim_s):
            self._worked = False
            self.cond.release()  # trimming takes milliseconds: don't hold up submit()
            try:
                trim_heap()
            finally:
                self.cond.acquire()

    def expire_waiting(self) -> None:
        now = time.monotonic()
        for job in [j for j in self.waiting if j.deadline <= now]:
            job.cancel_reason = job.cancel_reason or "deadline"
            self.waiting.remove(job)
            self.drop(job)
        self.publish_state()

    def drop(self, job: Job) -> None:
        reason = job.cancel_reason or "disconnected"
        if job.fail(JobCancelled(reason)) and self.metrics:
            self.metrics.cancelled(job.mode, reason)

    def wanted(self, job: Job, now: float) -> bool:
        if job.cancel_reason is None and job.deadline <= now:
            job.cancel_reason = "deadline"
        return job.cancel_reason is None

    def publish_state(self) -> None:
        if self.metrics:
            ahead = self.image_steps()
            self.metrics.queue_state(
                len(self.running), len(self.waiting), ahead, self.expected_wait_s(ahead)
            )
