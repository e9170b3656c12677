"""The engine worker: one thread owns the device and the model, and schedules requests.

HTTP handlers `submit()` jobs into a bounded queue (`JobQueue`) and await the job's future;
they never touch the model. The worker thread runs one of two schedulers
(`service.core.scheduler`):

* `continuous` (default): step-level batching. At every step boundary finished and
  cancelled rows leave the running batch, and a scheduling policy (fair, fifo or deadline:
  `service.core.policies`) chooses the rows of the next step, up to `max_batch_size`,
  admitting waiting requests and pausing rows that must wait (they keep their slots); rows
  at different steps, with different steps counts, cfg, classes and modes share every step,
  each keeping its own caches in the engine's slot pool;
* `static`: run-to-completion batches of compatible jobs (same steps and mode).

Either way, jobs whose client went away or whose deadline passed leave between steps (batch
mates are unaffected), streaming jobs get progress, and an exception fails only the jobs
that were in the failing step; the loop keeps serving.

No fastapi, ray or asyncio here: futures are `concurrent.futures.Future`s, which asyncio
handlers await with `asyncio.wrap_future`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

from engine.decode.marche import MarcheConfig
from engine.model.config import SamplingParams
from engine.pipeline import Pipeline
from service.core.jobs import EngineError, Job, JobCancelled, JobResult, QueueFull
from service.core.policies import make_policy, pool_rows
from service.core.queue import JobQueue
from service.core.rows import PipelineRows, RowEngine
from service.core.scheduler import ContinuousScheduler
from service.core.static import StaticScheduler
from service.metrics import Metrics

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
        warmup_params: SamplingParams | None = None,
        policy: str = "fair",
        pause_rows: int | None = None,
        aging_s: float = 10.0,
        tenant_queue_size: int | None = None,
        warmup_steps: int | None = 3,
    ) -> None:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}")
        self.pipeline = pipeline
        self.warmup_params = warmup_params  # None: the model's defaults
        self.warmup_steps = warmup_steps  # None: every warm-up row to its end
        self.marche = marche or MarcheConfig()
        self.metrics = metrics
        scheduling = make_policy(policy if scheduler == "continuous" else "fifo", aging_s)
        self.ready = False
        self.last_error: str | None = None
        self.queue = JobQueue(
            queue_size=queue_size,
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_ms / 1000,
            metrics=metrics,
            retry_after_s=retry_after_s,
            idle_trim_s=idle_trim_s,
            policy=scheduling,
            tenant_queue_size=tenant_queue_size,
        )
        self._scheduler: StaticScheduler | ContinuousScheduler
        if scheduler == "static":
            self._scheduler = StaticScheduler(self.queue, pipeline, self.marche, preview_every)
        else:
            capacity = pool_rows(max_batch_size, scheduling, pause_rows)
            rows = rows or PipelineRows(pipeline, capacity, self.marche)
            self.queue.slots = rows.capacity
            self._scheduler = ContinuousScheduler(self.queue, rows, preview_every)
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
        self.queue.drain()

    def stop(self, timeout: float = 30.0) -> None:
        """Drain, then wait up to `timeout` s for the running jobs and the thread to end."""
        self.drain()
        if self._thread is not None:
            self._thread.join(timeout)

    def configure(self, max_batch_size: int | None = None, max_wait_ms: float | None = None):
        """Change batching knobs at runtime (from the next batch on)."""
        with self.queue.cond:
            if max_batch_size is not None:
                self.queue.max_batch_size = max_batch_size
            if max_wait_ms is not None:
                self.queue.max_wait_s = max_wait_ms / 1000

    def submit(self, job: Job) -> Future:
        self.queue.submit(job)
        return job.future

    def cancel(self, job: Job, reason: str = "disconnected") -> None:
        """Drop a job: at once if queued, at the next step boundary if running."""
        self.queue.cancel(job, reason)

    def retry_after_s(self) -> int:
        """Seconds a refused request should wait (`JobQueue.retry_after_s`)."""
        return self.queue.retry_after_s()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return self.queue.counts()

    def scheduling(self) -> dict:
        """/info's view: the policy, the pool's slots, and who waits how long: per tenant
        (waiting and running now, the newest admission waits) and per priority."""
        q = self.queue
        with q.cond:
            now: dict[str, dict[str, int]] = {}
            for state, jobs in (("waiting", list(q.waiting)), ("running", list(q.running))):
                for job in jobs:
                    counts = now.setdefault(q.waits.tenant_label(job.tenant), {})
                    counts[state] = counts.get(state, 0) + 1
        view = q.waits.view()
        for tenant, counts in now.items():
            view["tenants"].setdefault(tenant, {}).update(counts)
        return {"policy": q.policy.name, "slots": q.slots, "rows_per_step": q.max_batch_size,
                "tenant_queue_size": q.tenant_queue_size, **view}  # fmt: skip

    def _units(self) -> dict:
        """The pipeline's units by family (none for a worker over a fake row engine)."""
        return self.pipeline.units.families() if self.pipeline is not None else {}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the worker thread -----------------------------------------------------------------------

    def _loop(self, warmup: bool) -> None:
        if warmup:
            try:
                started = time.monotonic()
                params = self.warmup_params or self.pipeline.spec.defaults
                self._scheduler.warmup(params, self.warmup_steps)
            except Exception as exc:  # noqa: BLE001 - reported through /readyz
                log.exception("warmup failed")
                self.last_error = f"warmup failed: {exc}"
                return
            built = ", ".join(
                f"{name} {u.stats.built} ({u.stats.build_seconds:.1f} s, "
                f"{u.stats.memory_bytes / 2**20:.0f} MiB)"
                for name, u in self._units().items() if u is not None
            )  # fmt: skip
            seconds = time.monotonic() - started
            steps = self.warmup_steps or "all"
            log.info(
                "warm-up (%s steps) in %.1f s; units built: %s", steps, seconds, built or "none"
            )
        self.ready = True
        self._scheduler.run()
        self.queue.refuse_waiting()  # shutting down: nothing accepted is silently lost
