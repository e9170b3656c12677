"""The jobs that the HTTP side and the worker thread share, under one lock.

HTTP handlers `submit()` and `cancel()` from any thread; the worker thread's scheduler admits
from `waiting` (FIFO), keeps `running` (job -> its rows) and blocks in `wait_for_work()` when
there is nothing to do. Every change of the two collections happens with `cond` held.

The queue also knows how much work it holds, in **image-steps** (one image advanced one
decoding step: a 4-image 32-step request is 128), and how long a step takes (`StepTime`:
measured at warm-up, then a moving average). From the two and the scheduling policy, the wait
of a request (`expected_wait_s`): `step_s × policy.start_steps(...)`, the steps before its
first one (`service.core.policies`). Under fifo that is all the work ahead of it,

    wait_s = step_s × ceil(image_steps_ahead / rows_at_once)

(`rows_at_once`: `max_batch_size`); under fair, the steps until it gets a slot; under
deadline, the work ranked before it. A 503's (and a tenant's 429's) Retry-After is that wait
for a request arriving now (for the tenant's oldest waiting request), rounded up, at least
`MARCHE_RETRY_AFTER_S` and at most 10 minutes. Streaming requests hear their place in the
queue and expected start whenever it changes (`queued` events).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

from engine.model.config import SamplingParams
from service.core.jobs import Job, JobCancelled, QueueFull, TenantBusy
from service.core.memory import trim_heap
from service.core.policies import Backlog, Claim, Fifo, Policy
from service.core.waits import WaitBook
from service.metrics import Metrics

NEWCOMER = SamplingParams(num_iter=1)  # the request a wait is estimated for when none is named


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
        policy: Policy | None = None,
        tenant_queue_size: int | None = None,
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
        self.policy = policy or Fifo()
        self.slots = max_batch_size  # the engine pool's slots (the worker sets it)
        self.tenant_queue_size = tenant_queue_size
        self.waits = WaitBook()
        self._worked = False  # work arrived since the heap was last trimmed

    # -- the HTTP side (any thread) --------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise QueueFull("the engine is shutting down")
            if len(self.waiting) >= self.queue_size:
                if self.metrics:
                    self.metrics.rejected("queue_full")
                retry = self.retry_after_s(job)
                raise QueueFull(f"queue full ({self.queue_size} requests waiting)", retry)
            own = [j for j in self.waiting if j.tenant == job.tenant]
            if self.tenant_queue_size is not None and len(own) >= self.tenant_queue_size:
                if self.metrics:
                    self.metrics.rejected("tenant_limit")
                retry = self._retry_after(self.expected_wait_s(own[0]))
                raise TenantBusy(f"too many requests waiting for this tenant ("
                                 f"{self.tenant_queue_size})", retry)  # fmt: skip
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

    def backlog(self) -> Backlog:
        with self.cond:
            running = [
                Claim(j, len(j.seeds) if r is None else len(r), len(j.seeds) - j.admitted, True)
                for j, r in self.running.items()
            ]  # static: a batch's jobs hold all their rows
            return Backlog(running, list(self.waiting), self.max_batch_size, self.slots)

    def expected_wait_s(self, job: Job | None = None) -> float | None:
        """Seconds until `job` runs its first step under the policy: a waiting request, or
        one arriving now (None: a 1-image request of the anonymous tenant); None before any
        step was timed."""
        step_s = self.step_time.seconds
        if step_s is None:
            return None
        job = job or Job(0, [0], NEWCOMER, "", math.inf)
        with self.cond:
            return step_s * self.policy.start_steps(self.backlog(), job, time.monotonic())

    def retry_after_s(self, job: Job | None = None) -> int:
        """Retry-After of a 503: the expected wait of `job` (or a newcomer) arriving now."""
        return self._retry_after(self.expected_wait_s(job))

    def _retry_after(self, wait: float | None) -> int:
        """A wait as Retry-After: rounded up, within [`min_retry_after_s`, 600]."""
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

    def record_wait(self, job: Job, wait_s: float) -> None:
        """A request admitted after `wait_s`: /info's per-tenant and per-priority waits, and
        its tenant's wait histogram."""
        label = self.waits.record(job.tenant, job.priority, wait_s)
        if self.metrics:
            self.metrics.tenant_wait(label, job.priority, wait_s)

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
            self.metrics.queue_state(
                len(self.running), len(self.waiting), self.image_steps(), self.expected_wait_s()
            )
        self._tell_positions()

    def _tell_positions(self) -> None:
        """A `queued` event to each waiting stream whose place in the queue changed."""
        streams = [j for j in self.waiting if j.on_event is not None]
        if not streams:
            return
        order = self.policy.order(list(self.waiting), time.monotonic())
        for job in streams:
            position = order.index(job)
            if position != job.position:
                job.position = position
                wait = self.expected_wait_s(job)
                start = None if wait is None else round(wait, 3)
                job.on_event({"queued": True, "position": position, "expected_start_s": start})
