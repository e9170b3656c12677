"""Step-level continuous batching: the worker's per-step core, as vLLM v1's.

Every image in flight is a **row** with its own slot in the engine's pool (caches, generator,
step), so each step the scheduler decides afresh which rows run:

1. **schedule**: retire cancelled and expired requests (their slots are freed), describe
   each request to the scheduling policy as a `Claim` and take its allotment
   (`service.core.policies`: fifo, fair or deadline); admit new images into free slots, and
   choose each request's rows (`choose_rows`). Rows left out are **paused**: they keep
   their slots and resume later exactly where they stopped.
2. **execute**: one engine step over the chosen rows, wherever each row is in its run.
3. **update**: count the step, decode and free the rows that finished, resolve the requests
   whose images are all done, report progress to streams.

The engine is reached through `RowEngine` (the real one: `PipelineRows`), so the scheduler is
tested with a fake (tests/service/test_scheduler.py). Run-to-completion batches are
`service.core.static`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from engine.decode.policy import MODES
from engine.model.config import SamplingParams
from service.core.jobs import EngineError, Job, JobResult
from service.core.policies import reserve_rows
from service.core.queue import JobQueue
from service.core.rows import RowEngine

log = logging.getLogger("marche.worker")


class ContinuousScheduler:
    def __init__(self, queue: JobQueue, rows: RowEngine, preview_every: int = 4) -> None:
        """The scheduling policy is the queue's (`queue.policy`): its wait estimates and
        this scheduler's choices come from the same object."""
        self.queue, self.rows, self.preview_every = queue, rows, preview_every

    def warmup(self, params: SamplingParams, steps: int | None = 3) -> None:
        """The first `steps` steps (None: every row to its end) of `max_batch_size` rows of
        `params` (the model's defaults), the modes in turn, then one image decoded: allocates
        the cache pool, picks kernels, builds what units are built on first use (all of them
        for a whole run of each mode) and times a full-width serving step, the queue's first
        step-time estimate. (A 2-step run would predict every token in two steps: far heavier
        steps than serving ones.)"""
        width = min(self.queue.max_batch_size, self.rows.capacity)
        jobs = [Job(0, [i], params, MODES[i % len(MODES)], float("inf")) for i in range(width)]
        rows = [row for job in jobs for row in self.rows.admit(job, [0])]
        live, taken, full_width_s = rows, 0, None
        while live and (steps is None or taken < max(1, min(steps, params.num_iter))):
            started = time.monotonic()
            self.rows.step(live)
            if len(live) == len(rows):
                full_width_s = time.monotonic() - started
            taken += 1
            live = [row for row in live if not self.rows.finished(row)]
        if full_width_s is not None:  # the last full-width step: kernels picked, pool warm
            self.queue.step_time.observe(full_width_s)
        self.rows.images(rows[:1])
        self.rows.release(rows)

    def run(self) -> None:
        q = self.queue
        running: dict[Job, dict[int, Any]] = q.running  # job -> its unfinished rows by image
        while True:
            # 1. schedule: retire dropped requests, then the policy's rows for this step
            with q.cond:
                now = time.monotonic()
                for job in [j for j in running if not q.wanted(j, now)]:
                    self.rows.release(list(running.pop(job).values()))
                    q.drop(job)
                if q.stopping and not running:
                    return
                q.expire_waiting()
                batch = self._schedule(running, now)
                q.publish_state()
                if not batch:
                    q.wait_for_work()
                    continue
            # 2. execute: one step for every chosen row
            rows = [row for _, _, row in batch]
            started = time.monotonic()
            try:
                self.rows.step(rows)
            except Exception as exc:  # noqa: BLE001 - fail the step's jobs, keep serving
                log.exception("a step of %d rows failed", len(rows))
                self._fail_step(running, {job for job, _, _ in batch}, exc)
                continue
            # 3. update: metrics, progress, finished rows and requests
            seconds = time.monotonic() - started
            q.step_time.observe(seconds)
            self._observe_step(batch, seconds)
            self._update(running, batch)

    def _schedule(self, running: dict[Job, dict[int, Any]], now: float) -> list[tuple]:
        """This step's (job, image, row) triples, new images admitted; waiting requests that
        got rows move to `running`."""
        q, policy = self.queue, self.queue.policy
        if not policy.pauses:  # whole requests: one that can never fit fails, not blocks
            for job in [j for j in q.waiting if len(j.seeds) > self.rows.capacity]:
                q.waiting.remove(job)
                job.fail(EngineError(f"{len(job.seeds)} images exceed the engine's "
                                     f"{self.rows.capacity} rows"))  # fmt: skip
        backlog = q.backlog()  # `running` is the queue's: its claims are the running ones
        claims, waiting = backlog.claims(), backlog.waiting
        width = min(q.max_batch_size, self.rows.capacity)
        reserve = reserve_rows(self.rows.capacity, width, policy)
        allotment = policy.allot(claims, width, backlog.free, now, reserve) if claims else {}
        batch, mid_flight = [], bool(running)  # joining rows that are already decoding
        for job in [j for j in waiting if allotment.get(j, 0)]:
            q.waiting.remove(job)
            running[job] = {}
            job.started_at = now
            q.record_wait(job, now - job.enqueued_at)
            if q.metrics:
                q.metrics.admitted(job.mode, allotment[job], now - job.enqueued_at, mid_flight)
        for job, n in allotment.items():
            held = running[job]
            new = list(range(job.admitted, job.admitted + max(0, n - len(held))))
            if new and not self._admit(running, job, new):
                continue
            batch += [(job, i, held[i]) for i in choose_rows(job, held, n, self.rows)]
        return batch

    def _admit(self, running: dict[Job, dict[int, Any]], job: Job, images: list[int]) -> bool:
        try:
            rows = self.rows.admit(job, images)
        except Exception as exc:  # noqa: BLE001 - e.g. a class id this model lacks
            self.rows.release(list(running.pop(job).values()))
            job.fail(EngineError(f"admission failed: {type(exc).__name__}: {exc}"))
            return False
        running[job].update(zip(images, rows, strict=True))
        job.admitted += len(images)
        return True

    def _update(self, running: dict[Job, dict[int, Any]], batch: list[tuple]) -> None:
        stepped: dict[Job, list[int]] = {}
        for job, image, _ in batch:
            stepped.setdefault(job, []).append(image)
        for job, images in stepped.items():
            held = running[job]
            job.image_steps_done += len(images)
            if job.on_event is not None:
                row = held[min(images)]
                step, total, done, seq_len = self.rows.progress(row)
                preview = partial(self.rows.preview, row)
                job.report(step, total, done, seq_len, preview, self.preview_every)
            finished = [i for i in images if self.rows.finished(held[i])]
            if finished:
                self._collect(job, [held[i] for i in finished], finished)
                with self.queue.cond:
                    self.rows.release([held.pop(i) for i in finished])
            if job.closed or len(job.images) == len(job.seeds):
                if not job.closed:
                    self._finish(job, len(batch))
                with self.queue.cond:
                    self.rows.release(list(running.pop(job).values()))

    def _collect(self, job: Job, rows: list[Any], images: list[int]) -> None:
        """Decode finished rows into the job's images (a failure fails the job only)."""
        try:
            decoded = self.rows.images(rows)
        except Exception as exc:  # noqa: BLE001 - the VAE failed for this job only
            log.exception("decoding %d images failed", len(rows))
            job.fail(EngineError(f"decoding failed: {type(exc).__name__}: {exc}"))
            return
        job.images.update(zip(images, decoded, strict=True))

    def _finish(self, job: Job, batch_size: int) -> None:
        now = time.monotonic()
        started = job.started_at or job.enqueued_at
        images = np.stack([job.images[i] for i in range(len(job.seeds))])
        result = JobResult(images, job.seeds, started - job.enqueued_at, now - started, batch_size)
        if job.succeed(result) and self.queue.metrics:
            self.queue.metrics.images(job.mode, len(job.seeds))

    def _fail_step(self, running: dict[Job, dict[int, Any]], jobs: set[Job], exc: Exception):
        """A step raised: fail the jobs whose rows were in it, free their slots."""
        with self.queue.cond:
            for job in jobs:
                self.rows.release(list(running.pop(job).values()))
                job.fail(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))

    def _observe_step(self, batch: list[tuple], seconds: float) -> None:
        metrics = self.queue.metrics
        if metrics is None:
            return
        metrics.occupancy(len(batch))
        by_mode: dict[str, list[float]] = {}
        for job, _, row in batch:
            by_mode.setdefault(job.mode, []).append(self.rows.active_fraction(row))
        for mode, fractions in by_mode.items():
            metrics.step(mode, seconds)
            metrics.batch_size(mode, len(fractions))
            metrics.active_fractions(mode, [sum(fractions) / len(fractions)])


def choose_rows(job: Job, held: dict[int, Any], n: int, rows: RowEngine) -> Sequence[int]:
    """Which `n` of a request's rows run: those with the most steps left (they decide when
    the request ends), so a request's images stay in step when some must pause."""
    done = {i: rows.progress(row)[0] for i, row in held.items()}  # steps taken (same total)
    return sorted(held, key=lambda i: (done[i], i))[:n]
